package preflight

import (
	"context"
	"fmt"

	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// checkReplicaIdentity: the stream names a changed row by the table's
// replica identity, which must hold the primary key; with none, adding the
// table to a publication would make PostgreSQL refuse its UPDATEs and
// DELETEs.
func checkReplicaIdentity(_ context.Context, in *inspection) (bool, error) {
	r, t := in.r, in.table
	fix := fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY DEFAULT", t.IdentityOf)
	of := "table " + t.IdentityOf
	if t.IdentityOf != t.Ident() {
		of = fmt.Sprintf("%s, part of %s,", t.IdentityOf, t.Ident())
	}
	switch t.ReplicaIdentity {
	case recompute.IdentityKey, recompute.IdentityFull:
		r.ok("replica identity: " + string(t.ReplicaIdentity))
	case recompute.IdentityOtherIndex:
		r.fail("replica identity", fmt.Sprintf("%s has REPLICA IDENTITY USING INDEX of an index other than its primary key; the stream would name changed rows by that index, the backfill and applier by the primary key", of), fix)
	default:
		r.fail("replica identity", fmt.Sprintf("%s has no replica identity (REPLICA IDENTITY NOTHING, or no primary key); once it is in the migration's publication PostgreSQL would refuse the application's UPDATEs and DELETEs on it", of),
			fix+" (with a primary key)")
	}
	return false, nil
}
