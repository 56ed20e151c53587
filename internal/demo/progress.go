package demo

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/phases"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// whatHappens is the line shown when the migration enters a phase.
var whatHappens = map[state.Phase]string{
	state.Expand:   "add first_name and last_name, under lock_timeout",
	state.Backfill: "slot with an exported snapshot; keyset batches fill the new columns while the stream runs",
	state.Sync:     "the slot's stream fixes every row the application changes; waiting for dual-write",
	state.Verify:   "the application dual-writes; parity scan over the whole table",
	state.Contract: "drop full_name under lock_timeout; drop slot and publication",
	state.Done:     "nothing left behind but the state row",
	state.Aborted:  "aborted",
}

// progress is what the person at the terminal sees while the daemon runs:
// a line per phase change with the time since the migration started, and
// during backfill a progress bar (redrawn in place on a terminal, a plain
// line a second otherwise). It is the only writer of out while it lives.
type progress struct {
	out    io.Writer
	redraw bool
	cfg    *config.Config
	conn   *pgx.Conn // reads the event log

	lastEvent int64
	started   time.Time   // the migration's "created" event
	phase     state.Phase // the last phase printed

	bar      *progressbar.ProgressBar
	lastLine time.Time // of the plain backfill line

	status  *phases.StatusReport // the last one read
	peakLag int64
}

// isTerminal reports whether w is a terminal, where lines may be redrawn.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// observe reads the status and the new phase changes and shows them.
// Errors are not fatal: before the daemon has created its state there is
// nothing to read, and the next tick tries again.
func (p *progress) observe(ctx context.Context) {
	r, err := phases.Status(ctx, p.cfg)
	if err == nil {
		p.status = r
		p.peakLag = max(p.peakLag, r.Sync.LagBytes)
	}
	p.printPhases(ctx)
	if p.phase == state.Backfill && p.status != nil && p.status.Phase == state.Backfill {
		p.showBackfill(p.status)
	}
}

// printPhases prints the phase changes logged since the last call, timed
// from the migration's start by the database's own clock.
func (p *progress) printPhases(ctx context.Context) {
	rows, err := p.conn.Query(ctx, `SELECT id, at, phase FROM cdcbackfill.events
		WHERE name = $1 AND kind IN ('created', 'phase') AND id > $2 ORDER BY id`, p.cfg.Name, p.lastEvent)
	if err != nil {
		return // the state schema does not exist yet
	}
	type change struct {
		id    int64
		at    time.Time
		phase state.Phase
	}
	var changes []change
	var c change
	if _, err := pgx.ForEachRow(rows, []any{&c.id, &c.at, &c.phase}, func() error {
		changes = append(changes, c)
		return nil
	}); err != nil {
		return
	}
	for _, c := range changes {
		p.lastEvent = c.id
		if p.started.IsZero() {
			p.started = c.at
		}
		if p.phase == state.Backfill {
			p.endBackfill()
		}
		p.phase = c.phase
		p.println(fmt.Sprintf("%7.1fs  %-9s %s", c.at.Sub(p.started).Seconds(), c.phase, whatHappens[c.phase]))
	}
}

// showBackfill draws rows done of the planned total.
func (p *progress) showBackfill(r *phases.StatusReport) {
	if r.Backfill.RowsTotal == 0 {
		return // the plan is not read yet
	}
	// The average since the phase began: the daemon's own figure is smoothed
	// for hours-long runs and lags behind in a seconds-long one; the bar's
	// starts counting late, when the first batches are done.
	rate := 0.0
	if took := time.Since(r.PhaseStartedAt).Seconds(); took > 0 {
		rate = float64(r.Backfill.RowsDone) / took
	}
	if !p.redraw {
		if time.Since(p.lastLine) >= time.Second {
			p.lastLine = time.Now()
			fmt.Fprintf(p.out, "          backfill  %s  %.0f rows/s\n", staticBar(r.Backfill.RowsDone, r.Backfill.RowsTotal), rate)
		}
		return
	}
	desc := fmt.Sprintf("          backfill  %6.0f rows/s", rate)
	if p.bar == nil {
		out := p.out
		p.bar = progressbar.NewOptions64(r.Backfill.RowsTotal,
			progressbar.OptionSetWriter(out),
			progressbar.OptionSetDescription(desc),
			progressbar.OptionSetWidth(30),
			progressbar.OptionShowCount(),
			progressbar.OptionSetPredictTime(false),
			progressbar.OptionThrottle(0),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(out) }),
		)
	} else {
		p.bar.Describe(desc)
	}
	_ = p.bar.Set64(min(r.Backfill.RowsDone, r.Backfill.RowsTotal))
}

// endBackfill completes the bar (or the plain lines) when backfill is over.
func (p *progress) endBackfill() {
	if p.bar != nil {
		_ = p.bar.Finish()
		p.bar = nil
		return
	}
	if !p.redraw && p.status != nil && p.status.Backfill.RowsTotal > 0 {
		fmt.Fprintf(p.out, "          backfill  %d rows done\n", p.status.Backfill.RowsDone)
	}
}

// println prints a line, first clearing the bar when it is drawn.
func (p *progress) println(line string) {
	if p.bar != nil {
		_ = p.bar.Clear()
	}
	fmt.Fprintln(p.out, strings.TrimRight(line, " "))
}

// staticBar draws the progress bar once, as a line, for output that is not
// a terminal (a log, a pipe): the same bar, without the redraws.
func staticBar(done, total int64) string {
	var sb strings.Builder
	bar := progressbar.NewOptions64(max(total, done, 1),
		progressbar.OptionSetWriter(&sb),
		progressbar.OptionSetWidth(30),
		progressbar.OptionShowCount(),
		progressbar.OptionSetPredictTime(false),
		progressbar.OptionThrottle(0),
	)
	_ = bar.Set64(done)
	drawn := sb.String()
	if i := strings.LastIndex(drawn, "\r"); i >= 0 {
		drawn = drawn[i+1:]
	}
	return strings.TrimSpace(drawn)
}
