package preflight

import (
	"fmt"

	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// Status is how a check ended, as plan prints it.
type Status string

const (
	OK   Status = "ok"
	Fail Status = "FAIL" // run refuses to start
	Warn Status = "warn" // run starts; the operator should know
	Info Status = "info" // what plan could not tell, or a fact worth saying
)

// Check is one line of `plan`: what was checked, and if it failed, the
// problem and the fix.
type Check struct {
	Name    string
	Status  Status
	Problem string
	Fix     string
}

// Report is what `plan` found and what `run` would do.
type Report struct {
	Checks []Check
	Table  *recompute.Table
	State  *state.Migration // nil when the migration has not started
	Lo, Hi recompute.Key
	Rows   int64
	// Settings are the values the expressions are evaluated with
	// ("TimeZone=UTC"): the database's and role's, as the daemon connects.
	Settings []string
	// Allowed is each statement the DDL rules refuse that the operator
	// allowed, with why it is refused: run logs them.
	Allowed []string
}

// OK is true when no check failed.
func (r *Report) OK() bool {
	for _, c := range r.Checks {
		if c.Status == Fail {
			return false
		}
	}
	return true
}

// Err is the first failed check as an error, or nil.
func (r *Report) Err() error {
	for _, c := range r.Checks {
		if c.Status == Fail {
			return fmt.Errorf("%s: %s (fix: %s)", c.Name, c.Problem, c.Fix)
		}
	}
	return nil
}

func (r *Report) ok(name string)                 { r.Checks = append(r.Checks, Check{Name: name, Status: OK}) }
func (r *Report) fail(name, problem, fix string) { r.add(Fail, name, problem, fix) }
func (r *Report) warn(name, problem, fix string) { r.add(Warn, name, problem, fix) }
func (r *Report) info(name, problem, fix string) { r.add(Info, name, problem, fix) }
func (r *Report) add(status Status, name, problem, fix string) {
	r.Checks = append(r.Checks, Check{Name: name, Status: status, Problem: problem, Fix: fix})
}
