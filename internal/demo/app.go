package demo

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Release is what the application writes: each value is one deploy of it.
type Release int32

const (
	// WritesOld is the application before the migration: full_name only.
	WritesOld Release = iota + 1
	// WritesBoth dual-writes full_name and first_name/last_name.
	WritesBoth
	// WritesNew writes first_name/last_name only: full_name is gone.
	WritesNew
)

func (r Release) String() string {
	switch r {
	case WritesOld:
		return "release 1 (writes full_name only)"
	case WritesBoth:
		return "release 2 (dual-writes full_name, first_name and last_name)"
	case WritesNew:
		return "release 3 (writes first_name and last_name only)"
	}
	return fmt.Sprintf("release %d", int32(r))
}

// undefinedColumn is SQLSTATE 42703: the contract dropped full_name.
const undefinedColumn = "42703"

// App is the application under migration: a few writers at a steady rate,
// each transaction mostly renaming a user, sometimes signing one up,
// rarely deleting one. In the same transaction it records in demo_expected
// what the row's first and last name must now be, so parity can be checked
// against what the application wrote rather than against the expressions.
type App struct {
	pool    *pgxpool.Pool
	release atomic.Int32
	nextID  atomic.Int64

	txs, failed atomic.Int64
	firstErr    atomic.Pointer[string]

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// startApp starts writers goroutines that together run about rate
// transactions per second against users, whose keys are 1..maxID.
func startApp(ctx context.Context, pool *pgxpool.Pool, writers int, rate float64, maxID int64) *App {
	ctx, cancel := context.WithCancel(ctx)
	a := &App{pool: pool, cancel: cancel}
	a.release.Store(int32(WritesOld))
	a.nextID.Store(maxID)
	every := time.Duration(float64(writers) / rate * float64(time.Second))
	for i := range writers {
		a.wg.Add(1)
		go func(seed uint64) {
			defer a.wg.Done()
			a.writer(ctx, rand.New(rand.NewPCG(seed, 2718)), every)
		}(uint64(i) + 1)
	}
	return a
}

// writer runs one transaction per tick until ctx ends.
func (a *App) writer(ctx context.Context, r *rand.Rand, every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		rel := a.Release()
		err := a.write(ctx, r, rel)
		var pgErr *pgconn.PgError
		if err != nil && rel != WritesNew && errors.As(err, &pgErr) && pgErr.Code == undefinedColumn {
			// full_name is gone: the application's next release goes out.
			// A deploy, not a failure; the transaction wrote nothing.
			a.release.CompareAndSwap(int32(rel), int32(WritesNew))
			continue
		}
		if ctx.Err() != nil {
			return // stopped mid-transaction: neither a success nor a failure
		}
		a.txs.Add(1)
		if err != nil && a.failed.Add(1) == 1 {
			msg := err.Error()
			a.firstErr.Store(&msg)
		}
	}
}

// write runs one application transaction in release rel.
func (a *App) write(ctx context.Context, r *rand.Rand, rel Release) error {
	op := r.IntN(20)
	id := r.Int64N(a.nextID.Load()) + 1
	n := r.IntN(1_000_000)
	first, last := fmt.Sprintf("first%d", n), fmt.Sprintf("last%d", r.IntN(1_000_000))
	return pgx.BeginFunc(ctx, a.pool, func(tx pgx.Tx) error {
		var err error
		switch {
		case op < 3: // sign up
			id = a.nextID.Add(1)
			email := fmt.Sprintf("user%d@example.com", id)
			switch rel {
			case WritesOld:
				_, err = tx.Exec(ctx, `INSERT INTO users (id, full_name, email) VALUES ($1, $2, $3)`, id, first+" "+last, email)
			case WritesBoth:
				_, err = tx.Exec(ctx, `INSERT INTO users (id, full_name, first_name, last_name, email) VALUES ($1, $2, $3, $4, $5)`,
					id, first+" "+last, first, last, email)
			default:
				_, err = tx.Exec(ctx, `INSERT INTO users (id, first_name, last_name, email) VALUES ($1, $2, $3, $4)`, id, first, last, email)
			}
		case op < 19: // rename
			switch rel {
			case WritesOld:
				_, err = tx.Exec(ctx, `UPDATE users SET full_name = $2 WHERE id = $1`, id, first+" "+last)
			case WritesBoth:
				_, err = tx.Exec(ctx, `UPDATE users SET full_name = $2, first_name = $3, last_name = $4 WHERE id = $1`,
					id, first+" "+last, first, last)
			default:
				_, err = tx.Exec(ctx, `UPDATE users SET first_name = $2, last_name = $3 WHERE id = $1`, id, first, last)
			}
		default: // delete
			if _, err = tx.Exec(ctx, `DELETE FROM users WHERE id = $1`, id); err == nil {
				_, err = tx.Exec(ctx, `DELETE FROM demo_expected WHERE id = $1`, id)
			}
			return err
		}
		if err != nil {
			return err
		}
		// A rename of a row that was deleted meanwhile found nothing: it
		// stays absent from demo_expected too.
		_, err = tx.Exec(ctx, `INSERT INTO demo_expected (id, first_name, last_name)
			SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM users WHERE id = $1)
			ON CONFLICT (id) DO UPDATE SET first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name`, id, first, last)
		return err
	})
}

// Release is what the application writes now.
func (a *App) Release() Release { return Release(a.release.Load()) }

// Deploy switches the application to rel (it never goes back).
func (a *App) Deploy(rel Release) bool {
	for {
		cur := a.release.Load()
		if cur >= int32(rel) {
			return false
		}
		if a.release.CompareAndSwap(cur, int32(rel)) {
			return true
		}
	}
}

// Stop stops the writers and waits for them.
func (a *App) Stop() {
	a.cancel()
	a.wg.Wait()
}

// Transactions returns how many transactions ran and how many failed, and
// the first failure.
func (a *App) Transactions() (total, failed int64, first string) {
	if p := a.firstErr.Load(); p != nil {
		first = *p
	}
	return a.txs.Load(), a.failed.Load(), first
}
