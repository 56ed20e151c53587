package phases

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// writer is a connection for the daemon's own writes, tagged with a
// replication origin when the role may set one.
func (d *Daemon) writerConn(ctx context.Context, kind string, i int) (*pgx.Conn, error) {
	conn, err := dbconn.Connect(ctx, d.cfg.Database.DSN)
	if err != nil {
		return nil, err
	}
	name := d.cfg.OriginPrefix() + kind + strconv.Itoa(i)
	_, err = conn.Exec(ctx, `SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)`, name)
	if err == nil {
		// A session of a daemon that just died still holds it.
		err = execWhileInUse(ctx, conn, 200*time.Millisecond, `SELECT pg_replication_origin_session_setup($1)`, name)
	}
	if err != nil {
		if dbconn.SQLState(err) != pgerrcode.InsufficientPrivilege {
			conn.Close(context.Background())
			return nil, fmt.Errorf("set replication origin %q: %w", name, err)
		}
		d.repl.originOnce.Do(func() {
			d.log.Warn("the role may not set a replication origin: the daemon's own writes come back through the stream, where re-applying them changes no row and writes no WAL; to skip them, GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text), pg_replication_origin_create(text) TO <role>",
				"err", err)
		})
	}
	return conn, nil
}

// writerConns opens n writer connections of one kind.
func (d *Daemon) writerConns(ctx context.Context, n int, kind string) ([]*pgx.Conn, error) {
	conns := make([]*pgx.Conn, 0, n)
	for i := 0; i < n; i++ {
		c, err := d.writerConn(ctx, kind, i)
		if err != nil {
			closeAll(conns)
			return nil, err
		}
		conns = append(conns, c)
	}
	return conns, nil
}

func closeAll(conns []*pgx.Conn) {
	for _, c := range conns {
		c.Close(context.Background())
	}
}

// dropOrigins removes the daemon's replication origins.
func dropOrigins(ctx context.Context, conn *pgx.Conn, prefix string) error {
	// A writer's session just closed still holds its origin for a moment on
	// the server.
	err := execWhileInUse(ctx, conn, 100*time.Millisecond,
		`SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE starts_with(roname, $1)`, prefix)
	if err == nil || dbconn.SQLState(err) == pgerrcode.InsufficientPrivilege {
		return nil
	}
	return fmt.Errorf("drop replication origins %s*: %w", prefix, err)
}

// execWhileInUse runs sql, again every pause while it fails with 55006
// (object in use: a replication origin another session still holds), at
// most 50 times more. It returns the last error, or ctx's.
func execWhileInUse(ctx context.Context, conn *pgx.Conn, pause time.Duration, sql string, args ...any) error {
	for try := 0; ; try++ {
		_, err := conn.Exec(ctx, sql, args...)
		if dbconn.SQLState(err) != pgerrcode.ObjectInUse || try == 50 {
			return err
		}
		if err := dbconn.Sleep(ctx, pause); err != nil {
			return err
		}
	}
}
