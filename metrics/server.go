package metrics

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Snapshot is what the daemon knows right now; the daemon fills it on request.
type Snapshot struct {
	Phase             string
	Paused            bool
	Leader            bool // holds the migration's lock and does the work
	Standby           bool // waits for the leader to die
	RowsDone          int64
	RowsTotal         int64
	RowsPerSecond     float64
	EtaSeconds        float64
	SlotLagBytes      int64
	ApplyLagSeconds   float64
	DeferredKeys      int64 // changed rows whose correction waits (sync.correction deferred)
	StreamEvents      int64
	Corrections       int64
	VerifyRowsChecked int64
	VerifyMismatches  int64 // rows out of parity now, not accepted
	MismatchesFound   int64 // rows ever found out of parity
	// PrematureDetections counts auto-detected dual-writes proved wrong.
	PrematureDetections int64
	DualWriteEvidence   int64   // evidence of dual-write in the window in hand (sync, detect auto)
	HoldProvenSeconds   float64 // parity proven clean so far (verify)
	CutoverStallSeconds float64 // the cut-over's longest application stall
	ThrottleReason      string  // "" when not throttled
	DDLRetries          int64
	// LastProgress is the last time the daemon made progress (batch, flush,
	// or heartbeat while idle in sync).
	LastProgress time.Time
	// Status is the JSON object served at /status (phases.StatusReport;
	// opaque here).
	Status any
}

// Source returns the daemon's current Snapshot; it is called on every
// request, with a deadline in ctx.
type Source func(ctx context.Context) (Snapshot, error)

const (
	// sourceTimeout bounds one call to the Source: a scrape or probe that
	// hangs is worse than one that fails.
	sourceTimeout = 2 * time.Second
	// progressWindow is how long the leader may go without progress and
	// still be ready; sync heartbeats while idle, so silence means stuck.
	progressWindow = 30 * time.Second
)

// Server serves /metrics, /healthz, /readyz and /status, GET and HEAD only.
type Server struct {
	addr string
	src  Source
	log  *slog.Logger
	now  func() time.Time

	handler http.Handler

	mu   sync.Mutex
	ln   net.Listener
	http *http.Server
}

// NewServer returns a Server for addr that reads everything it shows from
// src. A nil log discards.
func NewServer(addr string, src Source, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{addr: addr, src: src, log: log, now: time.Now}

	// A registry of its own: two servers in one process (tests) never collide.
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		newCollector(src, sourceTimeout),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)

	// Method patterns give 405 with an Allow header to anything but GET and
	// HEAD: the window has no control endpoints.
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:      errorLog{log},
		ErrorHandling: promhttp.HTTPErrorOnError,
	}))
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.HandleFunc("GET /status", s.status)
	s.handler = mux
	return s
}

// Start listens on the address and serves in a goroutine until Shutdown.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		return fmt.Errorf("http.listen %s: already started", s.addr)
	}
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		return fmt.Errorf("http.listen %s: %w", s.addr, listenCause(err))
	}
	s.ln = ln
	s.http = &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	srv := s.http
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("http server stopped", "addr", ln.Addr().String(), "err", err)
		}
	}()
	s.log.Info("http listening", "addr", ln.Addr().String())
	return nil
}

// listenCause strips net's "listen tcp ADDR: bind:" prefix so the message
// reads "http.listen ADDR: address already in use" and names the config key.
func listenCause(err error) error {
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se.Err
	}
	var oe *net.OpError
	if errors.As(err, &oe) {
		return oe.Err
	}
	return err
}

// Addr is the address the server listens on (the port chosen for ":0"), or
// the configured address before Start.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		return s.ln.Addr().String()
	}
	return s.addr
}

// Shutdown stops accepting and waits for requests in flight until ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	srv := s.http
	s.mu.Unlock()
	if srv == nil {
		return nil
	}
	return srv.Shutdown(ctx)
}

func (s *Server) snapshot(r *http.Request) (Snapshot, error) {
	ctx, cancel := context.WithTimeout(r.Context(), sourceTimeout)
	defer cancel()
	return s.src(ctx)
}

// healthz answers while the process can serve HTTP at all.
func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	writeText(w, http.StatusOK, "ok")
}

// readyz is 200 only for the leader that has made progress recently, so a
// load balancer or a page points at the daemon doing the work.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	snap, err := s.snapshot(r)
	if err != nil {
		writeText(w, http.StatusServiceUnavailable, "status unavailable: "+err.Error())
		return
	}
	if reason := s.notReady(snap); reason != "" {
		writeText(w, http.StatusServiceUnavailable, reason)
		return
	}
	writeText(w, http.StatusOK, "ok")
}

// notReady returns why snap is not ready, or "" when it is.
func (s *Server) notReady(snap Snapshot) string {
	switch {
	case snap.Standby:
		return "standby: another daemon leads this migration"
	case !snap.Leader:
		return "not leading this migration yet"
	case snap.LastProgress.IsZero():
		return "no progress yet"
	}
	if idle := s.now().Sub(snap.LastProgress); idle > progressWindow {
		return fmt.Sprintf("no progress for %s", idle.Truncate(time.Second))
	}
	return ""
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	snap, err := s.snapshot(r)
	if err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
		return
	}
	if snap.Status == nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "no status yet"})
		return
	}
	body, err := json.Marshal(snap.Status)
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "encode status: " + err.Error()})
		return
	}
	writeBody(w, http.StatusOK, "application/json", append(body, '\n'))
}

func writeText(w http.ResponseWriter, code int, line string) {
	writeBody(w, code, "text/plain; charset=utf-8", []byte(line+"\n"))
}

func writeJSON(w http.ResponseWriter, code int, v map[string]string) {
	body, _ := json.Marshal(v) // a map of strings always encodes
	writeBody(w, code, "application/json", append(body, '\n'))
}

func writeBody(w http.ResponseWriter, code int, contentType string, body []byte) {
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Cache-Control", "no-store") // every answer is "right now"
	w.WriteHeader(code)
	_, _ = w.Write(body) // HEAD: net/http drops the body
}

// errorLog routes promhttp's scrape errors to the daemon's log.
type errorLog struct{ log *slog.Logger }

func (e errorLog) Println(v ...any) { e.log.Warn("metrics scrape", "err", fmt.Sprint(v...)) }
