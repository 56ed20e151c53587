package config

import (
	"slices"
	"strings"
	"testing"
)

// TestModesMatchTheirChecks: each typed mode's constants are exactly the
// options its key's check tag accepts, so code comparing with a constant
// compares with a value the config can hold.
func TestModesMatchTheirChecks(t *testing.T) {
	cases := []struct {
		key    string
		consts []string
	}{
		{"sync.origin_filter", []string{string(OriginFilterAuto), string(OriginFilterClient)}},
		{"sync.correction", []string{string(CorrectionContinuous), string(CorrectionDeferred)}},
		{"dual_write.detect", []string{string(DetectManual), string(DetectAuto)}},
		{"contract_policy.mode", []string{string(ContractManual), string(ContractAuto), string(ContractNever)}},
	}
	for _, c := range cases {
		k, ok := findKey(c.key)
		if !ok {
			t.Fatalf("no key %s", c.key)
		}
		opts := strings.Split(k.tag.Get("check"), "|")
		slices.Sort(opts)
		slices.Sort(c.consts)
		if !slices.Equal(opts, c.consts) {
			t.Errorf("%s: check accepts %v, constants are %v", c.key, opts, c.consts)
		}
	}
}
