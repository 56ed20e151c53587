package preflight

import (
	"context"
	"fmt"
)

func checkPrivileges(ctx context.Context, in *inspection) (bool, error) {
	r, conn, t := in.r, in.conn, in.table
	var canUpdate, owns, canCreate bool
	err := conn.QueryRow(ctx, `SELECT has_table_privilege($1::regclass, 'SELECT, UPDATE'),
		pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = $1::regclass), 'USAGE'),
		has_database_privilege(current_database(), 'CREATE')`, t.Ident()).Scan(&canUpdate, &owns, &canCreate)
	if err != nil {
		r.fail("privileges", err.Error(), "")
		return false, nil
	}
	if !canUpdate {
		r.fail("privileges", fmt.Sprintf("the role may not SELECT and UPDATE %s", t.Ident()), fmt.Sprintf("GRANT SELECT, UPDATE ON %s TO <role>", t.Ident()))
	}
	if !owns {
		r.fail("privileges", fmt.Sprintf("the role does not own %s: the expand DDL and CREATE PUBLICATION need the owner", t.Ident()),
			fmt.Sprintf("run as the owner, or GRANT <owner role> TO <role>"))
	}
	if !canCreate {
		r.fail("privileges", "the role may not CREATE in this database (the publication and the state schema cdcbackfill)",
			"GRANT CREATE ON DATABASE <db> TO <role>")
	}
	if canUpdate && owns && canCreate {
		r.ok("privileges: UPDATE, owner of the table, CREATE on the database")
	}
	return false, nil
}
