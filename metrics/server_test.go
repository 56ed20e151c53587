package metrics_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/cdcbackfill/cdcbackfill/metrics"
)

// fakeDaemon is the Source a daemon would supply; the real one is tested
// with the daemon.
type fakeDaemon struct {
	mu   sync.Mutex
	snap metrics.Snapshot
	err  error
}

func (f *fakeDaemon) set(s metrics.Snapshot, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.snap, f.err = s, err
}

func (f *fakeDaemon) source(ctx context.Context) (metrics.Snapshot, error) {
	if _, ok := ctx.Deadline(); !ok {
		return metrics.Snapshot{}, errors.New("source called without a deadline")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.snap, f.err
}

func startServer(t *testing.T, f *fakeDaemon) string {
	t.Helper()
	s := metrics.NewServer("127.0.0.1:0", f.source, nil)
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	if s.Addr() == "127.0.0.1:0" {
		t.Fatalf("Addr() = %q, want the chosen port", s.Addr())
	}
	return "http://" + s.Addr()
}

func get(t *testing.T, method, url string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

// scrape returns each sample as "name{label=value}" -> value.
func scrape(t *testing.T, base string) map[string]float64 {
	t.Helper()
	resp, body := get(t, http.MethodGet, base+"/metrics")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %d %s", resp.StatusCode, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	out := map[string]float64{}
	for name, mf := range families {
		if strings.HasPrefix(name, "cdcbackfill_") && !strings.Contains(mf.GetHelp(), " ") {
			t.Errorf("%s: HELP %q does not tell the operator anything", name, mf.GetHelp())
		}
		for _, m := range mf.GetMetric() {
			key := name
			for _, l := range m.GetLabel() {
				key += "{" + l.GetName() + "=" + l.GetValue() + "}"
			}
			out[key] = value(mf.GetType(), m)
		}
	}
	return out
}

func value(typ dto.MetricType, m *dto.Metric) float64 {
	switch typ {
	case dto.MetricType_COUNTER:
		return m.GetCounter().GetValue()
	case dto.MetricType_GAUGE:
		return m.GetGauge().GetValue()
	default:
		return m.GetUntyped().GetValue()
	}
}

func TestMetricsFollowTheSnapshot(t *testing.T) {
	f := &fakeDaemon{}
	f.set(metrics.Snapshot{
		Phase: "backfill", Leader: true,
		RowsDone: 400, RowsTotal: 1000, RowsPerSecond: 250.5, EtaSeconds: 2.4,
		SlotLagBytes: 1 << 20, ApplyLagSeconds: 0.3, DeferredKeys: 1234,
		StreamEvents: 77, Corrections: 5,
		ThrottleReason: "replica lag 12s > 10s",
		DDLRetries:     2,
	}, nil)
	base := startServer(t, f)

	got := scrape(t, base)
	want := map[string]float64{
		"cdcbackfill_phase{phase=backfill}":                   1,
		"cdcbackfill_phase{phase=expand}":                     0,
		"cdcbackfill_phase{phase=sync}":                       0,
		"cdcbackfill_phase{phase=aborted}":                    0,
		"cdcbackfill_paused":                                  0,
		"cdcbackfill_leader":                                  1,
		"cdcbackfill_backfill_rows_done":                      400,
		"cdcbackfill_backfill_rows_total":                     1000,
		"cdcbackfill_backfill_rows_per_second":                250.5,
		"cdcbackfill_backfill_eta_seconds":                    2.4,
		"cdcbackfill_slot_lag_bytes":                          1 << 20,
		"cdcbackfill_apply_lag_seconds":                       0.3,
		"cdcbackfill_deferred_keys":                           1234,
		"cdcbackfill_stream_events_total":                     77,
		"cdcbackfill_corrections_total":                       5,
		"cdcbackfill_verify_rows_checked":                     0,
		"cdcbackfill_verify_mismatches":                       0,
		"cdcbackfill_throttled{reason=replica lag 12s > 10s}": 1,
		"cdcbackfill_ddl_retries_total":                       2,
	}
	check(t, got, want)
	for _, std := range []string{"go_goroutines", "process_start_time_seconds"} {
		if _, ok := got[std]; !ok {
			t.Errorf("%s missing: the Go and process collectors are not registered", std)
		}
	}

	// The next scrape sees the daemon's new state, with no stale series.
	f.set(metrics.Snapshot{
		Phase: "verify", Leader: true, Paused: true,
		RowsDone: 1000, RowsTotal: 1000,
		StreamEvents: 90, Corrections: 6,
		VerifyRowsChecked: 1000, VerifyMismatches: 3,
	}, nil)
	got = scrape(t, base)
	check(t, got, map[string]float64{
		"cdcbackfill_phase{phase=backfill}": 0,
		"cdcbackfill_phase{phase=verify}":   1,
		"cdcbackfill_paused":                1,
		"cdcbackfill_backfill_rows_done":    1000,
		"cdcbackfill_stream_events_total":   90,
		"cdcbackfill_corrections_total":     6,
		"cdcbackfill_verify_rows_checked":   1000,
		"cdcbackfill_verify_mismatches":     3,
		"cdcbackfill_throttled{reason=}":    0,
	})
	if _, ok := got["cdcbackfill_throttled{reason=replica lag 12s > 10s}"]; ok {
		t.Error("the old throttle reason is still exported")
	}
}

func check(t *testing.T, got, want map[string]float64) {
	t.Helper()
	for k, v := range want {
		g, ok := got[k]
		switch {
		case !ok:
			t.Errorf("%s missing", k)
		case g != v:
			t.Errorf("%s = %v, want %v", k, g, v)
		}
	}
}

func TestMetricsFailWhenTheSourceFails(t *testing.T) {
	f := &fakeDaemon{}
	f.set(metrics.Snapshot{}, errors.New("state row unreadable"))
	base := startServer(t, f)
	resp, body := get(t, http.MethodGet, base+"/metrics")
	if resp.StatusCode != http.StatusInternalServerError || !strings.Contains(body, "state row unreadable") {
		t.Errorf("/metrics with a failing source: %d %q", resp.StatusCode, body)
	}
}

func TestReadyz(t *testing.T) {
	now := time.Now()
	tests := []struct {
		name     string
		snap     metrics.Snapshot
		err      error
		wantCode int
		wantBody string
	}{
		{"leader making progress", metrics.Snapshot{Leader: true, LastProgress: now}, nil, 200, "ok"},
		{"standby", metrics.Snapshot{Standby: true, LastProgress: now}, nil, 503, "standby: another daemon leads this migration"},
		{"leader stuck", metrics.Snapshot{Leader: true, LastProgress: now.Add(-45 * time.Second)}, nil, 503, "no progress for 45s"},
		{"leader before first progress", metrics.Snapshot{Leader: true}, nil, 503, "no progress yet"},
		{"starting", metrics.Snapshot{}, nil, 503, "not leading this migration yet"},
		{"source fails", metrics.Snapshot{}, errors.New("boom"), 503, "status unavailable: boom"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeDaemon{}
			f.set(tt.snap, tt.err)
			resp, body := get(t, http.MethodGet, startServer(t, f)+"/readyz")
			if resp.StatusCode != tt.wantCode || body != tt.wantBody+"\n" {
				t.Errorf("/readyz = %d %q, want %d %q", resp.StatusCode, body, tt.wantCode, tt.wantBody)
			}
		})
	}
}

func TestHealthz(t *testing.T) {
	f := &fakeDaemon{}
	f.set(metrics.Snapshot{}, errors.New("even when the source fails"))
	resp, body := get(t, http.MethodGet, startServer(t, f)+"/healthz")
	if resp.StatusCode != 200 || body != "ok\n" {
		t.Errorf("/healthz = %d %q", resp.StatusCode, body)
	}
}

func TestStatusJSON(t *testing.T) {
	type report struct {
		Name  string `json:"name"`
		Phase string `json:"phase"`
		Sync  struct {
			LagBytes int64 `json:"lag_bytes"`
		} `json:"sync"`
		Error *string `json:"error"`
	}
	r := report{Name: "split_full_name", Phase: "sync"}
	r.Sync.LagBytes = 4096

	f := &fakeDaemon{}
	f.set(metrics.Snapshot{Status: r}, nil)
	base := startServer(t, f)

	resp, body := get(t, http.MethodGet, base+"/status")
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("/status = %d %s %q", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("/status is not JSON: %v: %q", err, body)
	}
	if got["name"] != "split_full_name" || got["phase"] != "sync" ||
		got["sync"].(map[string]any)["lag_bytes"] != 4096.0 || got["error"] != nil {
		t.Errorf("/status = %s", body)
	}

	f.set(metrics.Snapshot{}, errors.New("database unreachable"))
	resp, body = get(t, http.MethodGet, base+"/status")
	var e map[string]string
	if resp.StatusCode != 503 || json.Unmarshal([]byte(body), &e) != nil || e["error"] != "database unreachable" {
		t.Errorf("/status with a failing source = %d %q", resp.StatusCode, body)
	}
}

func TestReadOnly(t *testing.T) {
	f := &fakeDaemon{}
	f.set(metrics.Snapshot{Leader: true, LastProgress: time.Now(), Status: map[string]any{}}, nil)
	base := startServer(t, f)
	for _, path := range []string{"/metrics", "/healthz", "/readyz", "/status"} {
		for _, method := range []string{http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodPatch} {
			if resp, _ := get(t, method, base+path); resp.StatusCode != http.StatusMethodNotAllowed {
				t.Errorf("%s %s = %d, want 405", method, path, resp.StatusCode)
			}
		}
		if resp, body := get(t, http.MethodHead, base+path); resp.StatusCode != 200 || body != "" {
			t.Errorf("HEAD %s = %d %q", path, resp.StatusCode, body)
		}
	}
	for _, path := range []string{"/pause", "/abort", "/"} {
		if resp, _ := get(t, http.MethodGet, base+path); resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s = %d, want 404", path, resp.StatusCode)
		}
	}
}

func TestStartOnATakenPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()

	s := metrics.NewServer(addr, (&fakeDaemon{}).source, nil)
	err = s.Start()
	if want := "http.listen " + addr + ": address already in use"; err == nil || err.Error() != want {
		t.Fatalf("Start on a taken port: %v, want %q", err, want)
	}
	if err := s.Shutdown(context.Background()); err != nil {
		t.Errorf("Shutdown after a failed Start: %v", err)
	}
}
