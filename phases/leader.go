package phases

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// lead takes the migration's session advisory lock on a connection of its
// own; while another daemon holds it, this one waits as a standby.
func (d *Daemon) lead(ctx context.Context) (*pgx.Conn, error) {
	conn, err := dbconn.Connect(ctx, d.cfg.Database.DSN)
	if err != nil {
		return nil, err
	}
	obs := d.figures.obs
	said := false
	for {
		got, err := dbconn.TryLeaderLock(ctx, conn, d.cfg.Name)
		if err != nil {
			conn.Close(context.Background())
			if ctx.Err() != nil {
				return nil, nil
			}
			return nil, err
		}
		if got {
			obs.standby.Store(false)
			if said {
				d.log.Info("standby: the leader is gone; taking over")
			}
			return conn, nil
		}
		obs.standby.Store(true)
		if !said {
			d.log.Info("standby: another daemon runs this migration; waiting to take over")
			said = true
		}
		if err := dbconn.Sleep(ctx, time.Second); err != nil {
			conn.Close(context.Background())
			return nil, nil
		}
	}
}

// watch polls the state row for operator actions, publishes live figures,
// and checks that the leader lock's connection lives. It reads through the
// pool, which replaces a session that ended (terminated, or its socket
// dropped) while the lock's lives: a connection of its own would leave the
// leader deaf to approve, abort and pause for as long as it runs.
func (d *Daemon) watch(ctx context.Context, stop context.CancelCauseFunc, lock *pgx.Conn) {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if err := lock.Ping(ctx); err != nil && ctx.Err() == nil {
			stop(errLostLeadership)
			return
		}
		st, err := d.store.Load(ctx, d.pool)
		if err != nil {
			if ctx.Err() == nil {
				d.rlog.Warn("read state", "err", err)
			}
			continue
		}
		d.setControl(st)
		d.figures.obs.progressed()
		if st.AbortRequested && abortable(st) {
			// Everything in hand ends (a cut-over in flight rolls back).
			stop(ErrAborted)
			return
		}
		d.publishStatsOn(ctx, d.pool, st)
		d.rlog.Flush()
	}
}
