package preflight

import (
	"fmt"
	"io"
	"strings"

	"github.com/cdcbackfill/cdcbackfill/config"
)

// Print writes the checks, then what run would do.
func (r *Report) Print(w io.Writer, cfg *config.Config) {
	for _, c := range r.Checks {
		if c.Status == OK {
			fmt.Fprintf(w, "ok    %s\n", c.Name)
			continue
		}
		fmt.Fprintf(w, "%-5s %s: %s\n", c.Status, c.Name, c.Problem)
		if c.Fix != "" {
			fmt.Fprintf(w, "      fix: %s\n", c.Fix)
		}
	}
	if !r.OK() {
		fmt.Fprintln(w, "\nplan: problems found; nothing was changed")
		return
	}
	fmt.Fprintf(w, "\nplan for migration %q on %s\n", cfg.Name, r.Table.Ident())
	if r.State != nil {
		fmt.Fprintf(w, "  state: phase %s (rows done %d of %d)\n", r.State.Phase, r.State.RowsDone, r.State.RowsTotal)
	}
	keys := make([]string, len(r.Table.Key))
	for i, k := range r.Table.Key {
		keys[i] = k.Name
	}
	if r.Rows < 0 {
		fmt.Fprintf(w, "  key: (%s); rows unknown (never analyzed: ANALYZE %s)", strings.Join(keys, ", "), r.Table.Ident())
	} else {
		fmt.Fprintf(w, "  key: (%s); about %d rows", strings.Join(keys, ", "), r.Rows)
	}
	if r.Lo != nil {
		fmt.Fprintf(w, ", keys %s to %s", strings.Join(r.Lo, ","), strings.Join(r.Hi, ","))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "  1. expand (each under lock_timeout "+cfg.DDL.LockTimeout.String()+", retried):")
	printList(w, cfg.Expand)
	fmt.Fprintf(w, "  2. backfill: slot and publication %s, batches of %d rows, then keep in sync from the stream:\n", cfg.SlotName(), cfg.Backfill.BatchSize)
	for _, c := range cfg.Columns {
		fmt.Fprintf(w, "       %s = %s\n", c.Name, c.Expr)
	}
	if len(r.Settings) > 0 {
		fmt.Fprintf(w, "     evaluated with the database's and role's settings (as the daemon connects): %s\n", strings.Join(r.Settings, ", "))
	}
	if cfg.DualWrite.Detect == config.DetectAuto {
		fmt.Fprintf(w, "  3. sync until dual-write is detected: %d application writes of the new columns that needed no correction, and none that did, over %s of stream time\n",
			cfg.DualWrite.MinEvidence, cfg.DualWrite.QuietPeriod)
	} else {
		fmt.Fprintln(w, "  3. sync until dual-write is approved (cdcbackfill approve)")
	}
	fmt.Fprintf(w, "  4. verify: the application owns the new columns (never overwritten); one pass over the table, then parity proven clean for %s\n", cfg.ContractPolicy.Hold)
	fmt.Fprintf(w, "  5. contract (%s): one transaction under the table's ACCESS EXCLUSIVE lock (lock_timeout %s, kept below deadlock_timeout) checks what the stream delivered, then runs:\n",
		cfg.ContractPolicy.Mode, cfg.ContractPolicy.LockTimeout)
	printList(w, cfg.Contract)
	fmt.Fprintln(w, "plan: all checks passed; nothing was changed")
}

func printList(w io.Writer, stmts []string) {
	if len(stmts) == 0 {
		fmt.Fprintln(w, "       (none)")
	}
	for _, s := range stmts {
		fmt.Fprintf(w, "       %s\n", s)
	}
}
