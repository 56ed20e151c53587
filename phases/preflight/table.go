package preflight

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// checkTable: the table exists and has a primary key; nothing else can be
// checked without them.
func checkTable(ctx context.Context, in *inspection) (bool, error) {
	schema, name := in.cfg.TableIdent()
	t, err := recompute.InspectMigration(ctx, in.conn, in.cfg)
	switch {
	case errors.Is(err, recompute.ErrNoTable):
		in.r.fail("table", fmt.Sprintf("table %s.%s does not exist", schema, name), "check `table` (schema.table) and the database in database.dsn")
		return true, nil
	case errors.Is(err, recompute.ErrNoPrimaryKey):
		in.r.fail("primary key", fmt.Sprintf("table %s.%s has no primary key; the backfill walks the table by key and the stream names rows by key", schema, name),
			fmt.Sprintf("add one: ALTER TABLE %s ADD PRIMARY KEY (...)", pgx.Identifier{schema, name}.Sanitize()))
		return true, nil
	case err != nil:
		return false, err
	}
	in.r.Table, in.table = t, t
	in.r.ok(fmt.Sprintf("table %s exists", t.Ident()))
	keys := make([]string, len(t.Key))
	for i, k := range t.Key {
		keys[i] = k.Name + " " + k.Type
	}
	in.r.ok("primary key (" + strings.Join(keys, ", ") + ")")
	return false, nil
}
