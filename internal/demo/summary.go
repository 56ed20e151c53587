package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/docker/go-units"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/state"
)

// Summary is the account of one demo run.
type Summary struct {
	Rows         int64
	Phases       []PhaseTime
	BackfillRows int64 // rows the backfill wrote
	Corrections  int64
	PeakLag      int64 // bytes of WAL the slot held back, at most
	DDL          []DDLCost
	Cutover      *Cutover // nil until the contract cut-over committed
	AppTxs       int64
	AppFailed    int64
	AppFirstErr  string
	Parity       Parity
}

// PhaseTime is how long the migration stayed in a phase.
type PhaseTime struct {
	Phase      string
	Took       time.Duration
	Unfinished bool // the migration stopped in this phase
}

// DDLCost is what one DDL statement cost the daemon.
type DDLCost struct {
	Phase     string
	Statement string
	Tries     int
	LockWait  time.Duration
}

// Parity compares the migrated table with what the application wrote.
type Parity struct {
	Checked bool   // false when the new columns do not exist
	Why     string // why it was not checked
	Rows    int64  // rows on either side
	Differ  int64  // rows whose new columns differ, or present on one side only
}

// OK is true when parity was checked and holds.
func (p Parity) OK() bool { return p.Checked && p.Differ == 0 }

// readHistory fills the phase times and DDL costs from the event log.
func (s *Summary) readHistory(ctx context.Context, conn *pgx.Conn, name string) error {
	rows, err := conn.Query(ctx, `SELECT at, now(), phase, kind, coalesce(detail->>'statement', ''),
			coalesce((detail->>'tries')::int, 0), coalesce((detail->>'lock_wait_ms')::bigint, 0)
		FROM cdcbackfill.events WHERE name = $1 AND kind IN ('created', 'phase', 'ddl') ORDER BY id`, name)
	if err != nil {
		return fmt.Errorf("read the event log: %w", err)
	}
	var (
		at, now     time.Time
		entered     time.Time
		phase, kind string
		stmt, cur   string
		tries       int
		waitMS      int64
	)
	_, err = pgx.ForEachRow(rows, []any{&at, &now, &phase, &kind, &stmt, &tries, &waitMS}, func() error {
		if kind == "ddl" {
			s.DDL = append(s.DDL, DDLCost{Phase: phase, Statement: stmt, Tries: tries, LockWait: time.Duration(waitMS) * time.Millisecond})
			return nil
		}
		if cur != "" {
			s.Phases = append(s.Phases, PhaseTime{Phase: cur, Took: at.Sub(entered)})
		}
		cur, entered = phase, at
		return nil
	})
	if err != nil {
		return fmt.Errorf("read the event log: %w", err)
	}
	if cur != "" && cur != string(state.Done) && cur != string(state.Aborted) {
		s.Phases = append(s.Phases, PhaseTime{Phase: cur, Took: now.Sub(entered), Unfinished: true})
	}
	var c Cutover
	var wait, held, stall float64
	err = conn.QueryRow(ctx, `SELECT (detail->>'tries')::int, (detail->>'lock_wait_ms')::float8, (detail->>'held_ms')::float8,
			(detail->>'longest_stall_ms')::float8
		FROM cdcbackfill.events WHERE name = $1 AND kind = 'cutover' ORDER BY id DESC LIMIT 1`, name).Scan(&c.Tries, &wait, &held, &stall)
	if err == nil {
		c.LockWait, c.Held, c.Stall = msDuration(wait), msDuration(held), msDuration(stall)
		s.Cutover = &c
	} else if !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("read the event log: %w", err)
	}
	return nil
}

// Cutover is what the contract's cut-over cost the application.
type Cutover struct {
	Tries                 int
	LockWait, Held, Stall time.Duration
}

func msDuration(ms float64) time.Duration { return time.Duration(ms * float64(time.Millisecond)) }

// parityAgainstApp compares every row's new columns with what the
// application last wrote, by SQL of its own: no daemon figure is trusted.
const parityAgainstApp = `SELECT count(*),
	count(*) FILTER (WHERE u.id IS NULL OR e.id IS NULL
		OR u.first_name IS DISTINCT FROM e.first_name OR u.last_name IS DISTINCT FROM e.last_name)
FROM users u FULL JOIN demo_expected e ON e.id = u.id`

func checkParity(ctx context.Context, conn *pgx.Conn) (Parity, error) {
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_attribute
		WHERE attrelid = 'public.users'::regclass AND attname IN ('first_name', 'last_name') AND NOT attisdropped`).Scan(&n); err != nil {
		return Parity{}, fmt.Errorf("parity: %w", err)
	}
	if n != 2 {
		return Parity{Why: "first_name and last_name do not exist"}, nil
	}
	p := Parity{Checked: true}
	if err := conn.QueryRow(ctx, parityAgainstApp).Scan(&p.Rows, &p.Differ); err != nil {
		return Parity{}, fmt.Errorf("parity: %w", err)
	}
	return p, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Print writes the summary; the parity line last.
func (s *Summary) Print(w io.Writer) {
	fmt.Fprintln(w, "summary:")
	line := func(label, format string, args ...any) {
		fmt.Fprintf(w, "  %-26s %s\n", label+":", fmt.Sprintf(format, args...))
	}
	line("rows", "%d", s.Rows)
	var parts []string
	var total, backfill time.Duration
	for _, p := range s.Phases {
		part := fmt.Sprintf("%s %s", p.Phase, roundDuration(p.Took))
		if p.Unfinished {
			part += " (stopped there)"
		}
		parts = append(parts, part)
		total += p.Took
		if p.Phase == string(state.Backfill) {
			backfill = p.Took
		}
	}
	if len(parts) > 0 {
		line("phase times", "%s (total %s)", strings.Join(parts, ", "), roundDuration(total))
	}
	if backfill > 0 {
		line("backfill", "%d rows in %s, %.0f rows/s", s.BackfillRows, roundDuration(backfill), float64(s.BackfillRows)/backfill.Seconds())
	}
	line("stream corrections", "%d (rows the old release left stale, fixed from the slot's stream)", s.Corrections)
	line("peak slot lag", "%s", units.BytesSize(float64(s.PeakLag)))
	for _, d := range s.DDL {
		tries := "tries"
		if d.Tries == 1 {
			tries = "try"
		}
		line("lock wait, "+d.Phase+" DDL", "%d ms in %d %s (%s)", d.LockWait.Milliseconds(), d.Tries, tries, d.Statement)
	}
	if c := s.Cutover; c != nil {
		line("contract cut-over", "longest application stall %.1f ms (lock wait %.1f ms, held %.1f ms; %d %s)",
			ms(c.Stall), ms(c.LockWait), ms(c.Held), c.Tries, map[bool]string{true: "try", false: "tries"}[c.Tries == 1])
	}
	line("application transactions", "%d, failed %d", s.AppTxs, s.AppFailed)
	if s.AppFailed > 0 {
		line("first failure", "%s", s.AppFirstErr)
	}
	switch {
	case !s.Parity.Checked:
		fmt.Fprintf(w, "parity: NOT CHECKED (%s)\n", s.Parity.Why)
	case s.Parity.OK():
		fmt.Fprintf(w, "parity: OK (%d rows)\n", s.Parity.Rows)
	default:
		fmt.Fprintf(w, "parity: FAILED (%d rows differ)\n", s.Parity.Differ)
	}
}

func roundDuration(d time.Duration) time.Duration {
	if d >= 10*time.Second {
		return d.Round(100 * time.Millisecond)
	}
	return d.Round(10 * time.Millisecond)
}
