package applier

import "context"

// WaitVisible exposes waitVisible to the tests; call it only while Run is
// not running (it uses the applier's connection).
func (a *Applier) WaitVisible(ctx context.Context, xids []uint32) (waited bool, err error) {
	return a.waitVisible(ctx, xids)
}

// StillRunning exposes stillRunning to the tests.
var StillRunning = stillRunning
