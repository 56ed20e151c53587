package config

// The choices of the keys whose check tag lists them; each const is one of
// its key's check options (TestModesMatchTheirChecks keeps them equal).

// OriginFilter is sync.origin_filter: where the daemon's own writes leave
// the stream.
type OriginFilter string

const (
	OriginFilterAuto   OriginFilter = "auto"   // the walsender drops them (PostgreSQL 16+)
	OriginFilterClient OriginFilter = "client" // the daemon skips them
)

// Correction is sync.correction: when the stream corrects changed rows.
type Correction string

const (
	CorrectionContinuous Correction = "continuous" // within flush_interval
	CorrectionDeferred   Correction = "deferred"   // in bulk, in key order, after up to defer_for
)

// Detect is dual_write.detect: how the daemon learns that the application
// dual-writes.
type Detect string

const (
	DetectManual Detect = "manual" // the operator approves
	DetectAuto   Detect = "auto"   // from the stream's evidence
)

// ContractMode is contract_policy.mode: whether the contract waits for
// approval.
type ContractMode string

const (
	ContractManual ContractMode = "manual" // waits for approve
	ContractAuto   ContractMode = "auto"   // goes on once parity holds
	ContractNever  ContractMode = "never"  // stays in verify
)
