package preflight

import (
	"bytes"
	"testing"
)

// TestReport: a FAIL is the report's error and what plan prints of it,
// with its fix; warn and info lines do not fail it.
func TestReport(t *testing.T) {
	r := &Report{}
	r.ok("wal_level is logical")
	r.warn("max_slot_wal_keep_size", "is unlimited", "set it")
	r.info("failover", "no copy of the slot", "")
	if !r.OK() || r.Err() != nil {
		t.Fatalf("warn and info failed the report: %v", r.Err())
	}
	r.fail("role", "may not replicate", "ALTER ROLE <role> REPLICATION")
	if r.OK() || r.Err() == nil || r.Err().Error() != "role: may not replicate (fix: ALTER ROLE <role> REPLICATION)" {
		t.Fatalf("Err() = %v", r.Err())
	}
	var b bytes.Buffer
	r.Print(&b, nil)
	want := "ok    wal_level is logical\n" +
		"warn  max_slot_wal_keep_size: is unlimited\n      fix: set it\n" +
		"info  failover: no copy of the slot\n" +
		"FAIL  role: may not replicate\n      fix: ALTER ROLE <role> REPLICATION\n" +
		"\nplan: problems found; nothing was changed\n"
	if b.String() != want {
		t.Errorf("Print:\n%s\nwant:\n%s", b.String(), want)
	}
}
