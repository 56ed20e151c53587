package phases

import (
	"strings"
	"testing"
	"time"

	"github.com/cdcbackfill/cdcbackfill/state"
)

// The pure logic of the conductor, tested without a database.

func TestEvidenceWatch(t *testing.T) {
	start := time.Unix(1000, 0)
	w := evidenceWatch{minEvidence: 3, period: 10 * time.Second, syncSince: start}
	at := func(s int) time.Time { return start.Add(time.Duration(s) * time.Second) }
	steps := []struct {
		name       string
		now        int // wall clock, s
		evidence   uint64
		fixes      uint64
		streamTime int // commit time of the last transaction, s; -1: none yet
		missing    string
	}{
		{"idle from the start", 60, 0, 0, -1, "no application writes of the new columns seen for 1m0s"},
		{"a transaction with no evidence", 61, 0, 0, 61, "no application writes of the new columns seen"},
		{"some evidence", 62, 2, 0, 62, "2 of 3 writes seen"},
		{"enough, not yet quiet in stream time", 63, 3, 0, 63, "quiet for 2s of 10s of stream time"},
		{"the wall clock alone does not make it quiet", 200, 3, 0, 63, "quiet for 2s of 10s of stream time"},
		{"quiet in stream time", 201, 5, 0, 72, ""},
		{"a correction starts over", 202, 6, 1, 73, "no application writes of the new columns seen for 0s"},
		{"evidence after the correction", 203, 9, 1, 80, "quiet for 7s of 10s of stream time"},
		{"quiet again", 204, 9, 1, 84, ""},
	}
	for _, s := range steps {
		st := time.Time{}
		if s.streamTime >= 0 {
			st = at(s.streamTime)
		}
		dw := w.observe(at(s.now), s.evidence, s.fixes, st)
		if s.missing == "" && dw.Missing != "" || !strings.HasPrefix(dw.Missing, s.missing) {
			t.Errorf("%s: missing %q, want %q", s.name, dw.Missing, s.missing)
		}
	}
}

func TestSmoothRate(t *testing.T) {
	r := 0.0
	for range 20 {
		r = smoothRate(r, 1000, time.Second)
	}
	if r < 990 || r > 1000 {
		t.Errorf("steady 1000 rows/s smooths to %.0f", r)
	}
	if got := smoothRate(500, -10, time.Second); got != 500 {
		t.Errorf("a count that went back moved the rate to %.0f", got)
	}
	if got := smoothRate(500, 10, 0); got != 500 {
		t.Errorf("no time passed moved the rate to %.0f", got)
	}
}

func TestAbortable(t *testing.T) {
	cases := []struct {
		phase string
		done  int
		want  bool
	}{{"sync", 0, true}, {"contract", 0, true}, {"contract", 1, false}, {"done", 1, false}, {"aborted", 0, false}}
	for _, c := range cases {
		st := migrationIn(c.phase, c.done)
		if got := abortable(st); got != c.want {
			t.Errorf("abortable(%s, contract_done %d) = %v", c.phase, c.done, got)
		}
	}
}

func migrationIn(phase string, contractDone int) *state.Migration {
	return &state.Migration{Phase: state.Phase(phase), ContractDone: contractDone}
}
