package preflight

import (
	"context"
	"errors"

	"github.com/cdcbackfill/cdcbackfill/state"
)

// checkState reads the migration's state row, when it has started.
func checkState(ctx context.Context, in *inspection) (bool, error) {
	st, err := state.Store{Name: in.cfg.Name}.Load(ctx, in.conn)
	switch {
	case err == nil:
		in.r.State = st
	case errors.Is(err, state.ErrNoMigration):
	default:
		return false, err
	}
	return false, nil
}
