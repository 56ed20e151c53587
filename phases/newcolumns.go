package phases

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
)

// cutoverStatements are what the cut-over runs: the contract statements as
// they run, then what attaches the steps built before it (SET NOT NULL on
// a validated check, the unique constraints USING INDEX, the checks'
// drops). contract_done counts them.
func cutoverStatements(f *ddl.Finish) []string {
	if f == nil {
		return nil
	}
	return append(append([]string{}, f.Contract...), f.Attach...)
}

// buildIndexes builds the indexes on new columns CONCURRENTLY, once verify
// starts: after the backfill, which so paid no index maintenance. A build
// waits while the throttle holds (paused, a standby or the slot behind);
// its waits for older snapshots are bounded by ddl.concurrent_timeout, and
// an INVALID leftover of a failed try is dropped and built again.
func (d *Daemon) buildIndexes(ctx context.Context) error {
	if len(d.finish.Indexes) == 0 {
		return nil
	}
	throttle := d.newThrottle("index build")
	for _, ix := range d.finish.Indexes {
		b := ddl.IndexBuild{
			SQL: ix.SQL, Schema: ix.Schema, Name: ix.Name,
			Timeout: d.cfg.DDL.ConcurrentTimeout, MaxRetries: d.cfg.DDL.MaxRetries, Log: d.log,
			Waiting: func(s string) {
				if s != "" {
					d.figures.waiting.Store(fmt.Sprintf("index %s: %s", ix.Name, s))
				}
			},
			Allow: func(ctx context.Context) error { return throttle.Wait(ctx, 0) },
		}
		begin := time.Now()
		tries, err := b.Run(ctx, d.conn)
		if err != nil {
			return fmt.Errorf("verify: build index %s: %w", ix.Name, err)
		}
		d.log.Info("verify: index on new columns valid", "index", ix.Name, "tries", tries, "took", time.Since(begin).Round(time.Millisecond))
	}
	return nil
}

// errViolated is a constraint that VALIDATE found rows against.
type errViolated struct {
	name string
	err  error
}

func (e *errViolated) Error() string {
	return fmt.Sprintf("rows violate %s: %v; the application must fix them (the daemon validates again every few seconds), or abort", e.name, e.err)
}

// prepareConstraints adds the constraints on new columns NOT VALID and
// validates them, after the hand-over and before the cut-over. Adding
// takes the table's ACCESS EXCLUSIVE lock (SHARE ROW EXCLUSIVE for a
// foreign key) for no scan, under ddl.lock_timeout with retries; VALIDATE
// reads the table under SHARE UPDATE EXCLUSIVE, which blocks neither reads
// nor writes. Each step is read from the catalog first, so a restart
// resumes where it stood. A VALIDATE that finds rows against the
// constraint is an errViolated: nothing failed for the application, and
// the contract waits.
func (d *Daemon) prepareConstraints(ctx context.Context) error {
	runner := d.ddlRunner()
	validator := d.ddlRunner()
	validator.LockTimeout = d.cfg.DDL.ConcurrentTimeout
	for _, c := range d.finish.Prepare {
		exists, valid, err := constraintState(ctx, d.conn, d.table.Ident(), c.Name)
		if err != nil {
			return err
		}
		if valid {
			continue
		}
		if !exists {
			if _, err := runner.Run(ctx, d.conn, c.Add, func(pgx.Tx) error { return nil }); err != nil {
				return fmt.Errorf("contract: add %s NOT VALID: %w", c.What, err)
			}
			d.log.Info("contract: constraint added NOT VALID: new writes are checked from now on", "constraint", c.Name, "statement", c.Add)
		}
		begin := time.Now()
		if _, err := validator.Run(ctx, d.conn, c.Validate, func(pgx.Tx) error { return nil }); err != nil {
			switch dbconn.SQLState(err) {
			case pgerrcode.CheckViolation, pgerrcode.ForeignKeyViolation, pgerrcode.NotNullViolation:
				return &errViolated{name: c.What, err: err}
			}
			return fmt.Errorf("contract: validate %s: %w", c.What, err)
		}
		d.log.Info("contract: constraint validated", "constraint", c.Name, "took", time.Since(begin).Round(time.Millisecond))
	}
	return nil
}

// constraintState reads whether constraint name of table exists and is
// validated.
func constraintState(ctx context.Context, q dbconn.Querier, table, name string) (exists, valid bool, err error) {
	err = q.QueryRow(ctx, `SELECT convalidated FROM pg_constraint WHERE conrelid = $1::regclass AND conname = $2`, table, name).Scan(&valid)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return false, false, nil
	case err != nil:
		return false, false, fmt.Errorf("look up constraint %s: %w", name, err)
	}
	return true, valid, nil
}

// indexesBuilt builds the indexes on new columns (buildIndexes); a build
// that fails waits with the reason in status, and false says to try again.
// A lost connection is an error: the conductor starts over.
func (d *Daemon) indexesBuilt(ctx context.Context) (bool, error) {
	err := d.buildIndexes(ctx)
	switch {
	case err == nil:
		return true, nil
	case ctx.Err() != nil:
		return false, nil
	case isConnLoss(err):
		return false, err
	}
	d.figures.waiting.Store(err.Error())
	d.rlog.Warn("verify: an index on the new columns could not be built; trying again", "error", err)
	_ = dbconn.Sleep(ctx, 10*time.Second)
	return false, nil
}

// constraintsReady runs prepareConstraints; rows against a constraint make
// the contract wait with the reason in status, and false says to look
// again.
func (d *Daemon) constraintsReady(ctx context.Context) (bool, error) {
	var violated *errViolated
	switch err := d.prepareConstraints(ctx); {
	case errors.As(err, &violated):
		d.figures.waiting.Store(violated.Error())
		d.rlog.Warn("contract: rows violate a constraint on the new columns; waiting for the application to fix them", "constraint", violated.name)
		_ = dbconn.Sleep(ctx, 5*time.Second)
		return false, nil
	case err != nil:
		return false, err
	}
	return true, nil
}
