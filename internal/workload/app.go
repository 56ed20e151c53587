// Package workload is the application under migration that the demo, the
// tests and the benchmarks run against the running example's users table:
// writers at a steady pace that rename, sign up, change other columns and
// delete users, through the application's releases (full_name only,
// dual-write, the new columns only).
//
// Invariant: with an expected table, every transaction records there, in
// the same transaction, what the row's new columns must now hold (what the
// application wrote, or what the expressions make of a full_name-only
// write), so parity is checked against what the application wrote, by SQL
// of its own, never against the daemon's figures.
package workload

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgerrcode"
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

// Mix weighs the kinds of transactions; the zero Mix is the demo's: mostly
// renames, some sign-ups, a few deletes.
type Mix struct {
	SignUps, Renames, Emails, Deletes int
}

// DefaultMix is what an application of users does.
var DefaultMix = Mix{SignUps: 3, Renames: 16, Deletes: 1}

// Options say what the application does.
type Options struct {
	Writers int           // concurrent writers, each on its own connection of the pool
	Pause   time.Duration // between one writer's transactions
	MaxID   int64         // users has keys 1..MaxID at the start
	Seed    uint64
	Mix     Mix // zero: DefaultMix
	// Expected names the table that records what each row's new columns
	// must hold ("" records nothing); see CreateExpected.
	Expected string
	// Release is the release at the start (zero: WritesOld).
	Release Release
	// Pinned keeps the release: a write that finds full_name gone is a
	// failure, where an unpinned application deploys WritesNew (its next
	// release) and goes on. A straggler of the old release is pinned.
	Pinned bool
}

// Failure is a transaction that failed, and when.
type Failure struct {
	At  time.Time
	Err error
}

// App is the application, running until Stop.
type App struct {
	pool    *pgxpool.Pool
	opts    Options
	release atomic.Int32
	wrong   atomic.Bool
	nextID  atomic.Int64

	txs     atomic.Int64
	mu      sync.Mutex
	failed  []Failure
	stopped bool

	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
}

// Start starts the writers.
func Start(pool *pgxpool.Pool, opts Options) *App {
	if opts.Mix == (Mix{}) {
		opts.Mix = DefaultMix
	}
	if opts.Release == 0 {
		opts.Release = WritesOld
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &App{pool: pool, opts: opts, cancel: cancel}
	a.release.Store(int32(opts.Release))
	a.nextID.Store(opts.MaxID)
	for i := range opts.Writers {
		a.wg.Add(1)
		go func(stream uint64) {
			defer a.wg.Done()
			a.writer(ctx, rand.New(rand.NewPCG(opts.Seed, stream)))
		}(uint64(i) + 1)
	}
	return a
}

func (a *App) writer(ctx context.Context, r *rand.Rand) {
	for ctx.Err() == nil {
		rel := a.Release()
		err := a.write(ctx, r, rel)
		var pgErr *pgconn.PgError
		if err != nil && !a.opts.Pinned && rel != WritesNew && errors.As(err, &pgErr) && pgErr.Code == pgerrcode.UndefinedColumn {
			// full_name is gone: the application's next release goes out.
			// A deploy, not a failure; the transaction wrote nothing.
			a.release.CompareAndSwap(int32(rel), int32(WritesNew))
			continue
		}
		if ctx.Err() != nil {
			return // stopped mid-transaction: neither a success nor a failure
		}
		a.txs.Add(1)
		if err != nil {
			a.mu.Lock()
			a.failed = append(a.failed, Failure{time.Now(), err})
			a.mu.Unlock()
		}
		select {
		case <-ctx.Done():
		case <-time.After(a.opts.Pause):
		}
	}
}

// write runs one application transaction in release rel.
func (a *App) write(ctx context.Context, r *rand.Rand, rel Release) error {
	m := a.opts.Mix
	op := r.IntN(m.SignUps + m.Renames + m.Emails + m.Deletes)
	id := r.Int64N(a.nextID.Load()) + 1
	first, last := fmt.Sprintf("first%d", r.IntN(1_000_000)), fmt.Sprintf("last%d", r.IntN(1_000_000))
	wrote := first // what the application writes into first_name
	if rel == WritesBoth && a.wrong.Load() {
		wrote = "WRONG" // its rule disagrees with the expression
	}
	return pgx.BeginFunc(ctx, a.pool, func(tx pgx.Tx) error {
		var tag pgconn.CommandTag
		var err error
		switch {
		case op < m.SignUps:
			id = a.nextID.Add(1)
			email := fmt.Sprintf("user%d@example.com", id)
			switch rel {
			case WritesOld:
				tag, err = tx.Exec(ctx, `INSERT INTO users (id, full_name, email) VALUES ($1, $2, $3)`, id, first+" "+last, email)
			case WritesBoth:
				tag, err = tx.Exec(ctx, `INSERT INTO users (id, full_name, first_name, last_name, email) VALUES ($1, $2, $3, $4, $5)`,
					id, first+" "+last, wrote, last, email)
			default:
				tag, err = tx.Exec(ctx, `INSERT INTO users (id, first_name, last_name, email) VALUES ($1, $2, $3, $4)`, id, first, last, email)
			}
		case op < m.SignUps+m.Renames:
			switch rel {
			case WritesOld:
				tag, err = tx.Exec(ctx, `UPDATE users SET full_name = $2 WHERE id = $1`, id, first+" "+last)
			case WritesBoth:
				tag, err = tx.Exec(ctx, `UPDATE users SET full_name = $2, first_name = $3, last_name = $4 WHERE id = $1`,
					id, first+" "+last, wrote, last)
			default:
				tag, err = tx.Exec(ctx, `UPDATE users SET first_name = $2, last_name = $3 WHERE id = $1`, id, first, last)
			}
		case op < m.SignUps+m.Renames+m.Emails:
			// Another column: the new columns keep what they hold.
			_, err = tx.Exec(ctx, `UPDATE users SET email = $2 WHERE id = $1`, id, fmt.Sprintf("e%d", r.IntN(1000)))
			return err
		default:
			// Only a row the DELETE removed leaves the expected table: a
			// sign-up not committed yet is invisible to it but not to the
			// next statement, which would find its expected row.
			if tag, err = tx.Exec(ctx, `DELETE FROM users WHERE id = $1`, id); err == nil && tag.RowsAffected() > 0 && a.opts.Expected != "" {
				_, err = tx.Exec(ctx, `DELETE FROM `+pgx.Identifier{a.opts.Expected}.Sanitize()+` WHERE id = $1`, id)
			}
			return err
		}
		// A rename that found no row wrote nothing, and records nothing: the
		// row was deleted, or is a sign-up not committed yet. The next
		// statement's snapshot may see that sign-up, so its existence is no
		// test; recording there would claim a write users never got.
		if err != nil || a.opts.Expected == "" || tag.RowsAffected() == 0 {
			return err
		}
		_, err = tx.Exec(ctx, `INSERT INTO `+pgx.Identifier{a.opts.Expected}.Sanitize()+` (id, first_name, last_name)
			VALUES ($1, $2, $3)
			ON CONFLICT (id) DO UPDATE SET first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name`, id, first, last)
		return err
	})
}

// Release is what the application writes now.
func (a *App) Release() Release { return Release(a.release.Load()) }

// Deploy switches the application to rel; it never goes back, and reports
// whether it switched.
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

// RollBack switches the application back to rel, whatever it writes now
// (an operator rolling a release back before an abort).
func (a *App) RollBack(rel Release) { a.release.Store(int32(rel)) }

// SetWrong makes the dual-writing release write first_name by a rule that
// disagrees with the expression ("WRONG"); the expected table still records
// the right value, so those rows show as differing until fixed.
func (a *App) SetWrong(wrong bool) { a.wrong.Store(wrong) }

// Stopped reports whether Stop was called.
func (a *App) Stopped() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.stopped
}

// Stop stops the writers and waits for them; it may be called again.
func (a *App) Stop() {
	a.once.Do(func() {
		a.mu.Lock()
		a.stopped = true
		a.mu.Unlock()
		a.cancel()
		a.wg.Wait()
	})
}

// Transactions returns how many transactions ran and how many failed.
func (a *App) Transactions() (total, failed int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.txs.Load(), int64(len(a.failed))
}

// Failures returns the failed transactions, oldest first.
func (a *App) Failures() []Failure {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]Failure(nil), a.failed...)
}
