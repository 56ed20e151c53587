package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cdcbackfill/cdcbackfill/internal/workload"
)

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metricValue finds one sample in a Prometheus text exposition.
func metricValue(t *testing.T, body, series string) float64 {
	t.Helper()
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, series+" ") {
			v, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(line, series)), 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return v
		}
	}
	t.Fatalf("no series %s in\n%s", series, body)
	return 0
}

func withListen(yaml, addr string) string {
	return strings.Replace(yaml, "http:\n  listen: \"\"\n", fmt.Sprintf("http:\n  listen: %q\n", addr), 1)
}

// TestMetricsAndStatusDuringRun scrapes /metrics and /status while the
// backfill runs and checks them against the state row.
func TestMetricsAndStatusDuringRun(t *testing.T) {
	dsn, pool := seed(t, 60000)
	addr := freePort(t)
	cfg := writeConfig(t, withListen(usersConfig(dsn), addr)+"backfill:\n  max_rows_per_second: 15000\n  batch_size: 1000\n")
	startDaemon(t, cfg)
	base := "http://" + addr
	waitFor(t, time.Minute, "backfill under way", func() bool {
		return phase(t, pool) == "backfill" && query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`) > 5000
	})
	before := query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`)
	code, body := httpGet(t, base+"/metrics")
	after := query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`)
	if code != 200 {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	if got := int64(metricValue(t, body, "cdcbackfill_backfill_rows_done")); got < before || got > after {
		t.Errorf("rows_done metric %d, state row went from %d to %d", got, before, after)
	}
	if v := metricValue(t, body, `cdcbackfill_phase{phase="backfill"}`); v != 1 {
		t.Errorf(`phase{backfill} = %v`, v)
	}
	if v := metricValue(t, body, "cdcbackfill_leader"); v != 1 {
		t.Errorf("leader = %v", v)
	}
	if total := query[int64](t, pool, `SELECT rows_total FROM cdcbackfill.migrations`); int64(metricValue(t, body, "cdcbackfill_backfill_rows_total")) != total {
		t.Errorf("rows_total metric differs from the state row (%d)", total)
	}
	code, body = httpGet(t, base+"/status")
	if code != 200 {
		t.Fatalf("/status: %d %s", code, body)
	}
	var st struct {
		Name     string `json:"name"`
		Phase    string `json:"phase"`
		Backfill struct {
			RowsDone  int64 `json:"rows_done"`
			RowsTotal int64 `json:"rows_total"`
		} `json:"backfill"`
		Sync struct {
			LagBytes *int64 `json:"lag_bytes"`
		} `json:"sync"`
		Error *string `json:"error"`
	}
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatalf("/status is not JSON: %v\n%s", err, body)
	}
	if st.Name != "split_full_name" || st.Phase != "backfill" || st.Backfill.RowsDone < before || st.Sync.LagBytes == nil {
		t.Errorf("/status does not match the state: %s", body)
	}
	if code, body := httpGet(t, base+"/readyz"); code != 200 {
		t.Errorf("/readyz: %d %s", code, body)
	}
	if code, _ := httpGet(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz: %d", code)
	}
	r := cli(t, 10*time.Second, nil, "status", "--json", "--config", cfg)
	for _, key := range []string{`"rows_per_second"`, `"eta_seconds"`, `"lag_seconds"`, `"events"`, `"corrections"`, `"rows_checked"`, `"mismatches"`, `"paused"`, `"error"`} {
		if !strings.Contains(r.stdout, key) {
			t.Errorf("status --json lacks %s\n%s", key, r)
		}
	}
}

// TestStandbyTakesOver: a second daemon with the same config waits as a
// standby (readyz says so), and finishes the migration when the leader is
// killed.
func TestStandbyTakesOver(t *testing.T) {
	dsn, pool := seed(t, 40000)
	seedExpected(t, pool)
	a := startApp(t, pool, 2, 40000)
	defer a.Stop()
	yaml := autoConfig(dsn) + "backfill:\n  max_rows_per_second: 20000\n  batch_size: 1000\n"
	addr1, addr2 := freePort(t), freePort(t)
	leader := startDaemon(t, writeConfig(t, withListen(yaml, addr1)))
	waitFor(t, time.Minute, "the leader to start the backfill", func() bool { return phase(t, pool) == "backfill" })
	standby := startDaemon(t, writeConfig(t, withListen(yaml, addr2)))
	waitFor(t, 30*time.Second, "the standby to say so", func() bool {
		code, body := httpGet(t, "http://"+addr2+"/readyz")
		return code == 503 && strings.Contains(body, "standby")
	})
	leader.kill()
	waitFor(t, 30*time.Second, "the standby to lead", func() bool {
		code, _ := httpGet(t, "http://"+addr2+"/readyz")
		return code == 200
	})
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	a.Deploy(workload.WritesBoth)
	if code := standby.wait(t, 3*time.Minute); code != 0 {
		t.Fatalf("standby exit %d\n%s", code, standby.output())
	}
	if p := phase(t, pool); p != "done" {
		t.Fatalf("phase %s", p)
	}
	waitFor(t, time.Minute, "the app to switch to the new columns", func() bool { return a.Release() == workload.WritesNew })
	a.Stop()
	if n := differFromExpected(t, pool); n != 0 {
		t.Errorf("%d rows differ from what the writers last wrote", n)
	}
	if !strings.Contains(standby.output(), "taking over") {
		t.Errorf("the standby did not log the take-over\n%s", standby.output())
	}
}
