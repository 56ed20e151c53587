package repeatlog

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// A message repeated 300 times in 30s makes two lines: the first, and one
// summary with the count; nothing is lost.
func TestRepeatsAreSummarized(t *testing.T) {
	var buf bytes.Buffer
	l := New(slog.New(slog.NewTextHandler(&buf, nil)), 30*time.Second)
	clock := time.Unix(1000, 0)
	l.now = func() time.Time { return clock }
	for i := 0; i < 300; i++ {
		l.Info("verify: hold starts again", "key", i)
		clock = clock.Add(100 * time.Millisecond)
	}
	l.Info("verify: hold starts again", "key", 300) // 30s later: summary, then this one
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("want 3 lines, got %d:\n%s", len(lines), buf.String())
	}
	if !strings.Contains(lines[1], "repeated=299") || !strings.Contains(lines[1], "key=299") {
		t.Errorf("summary line %q: want repeated=299 and the last key", lines[1])
	}
	if !strings.Contains(lines[2], "key=300") {
		t.Errorf("line %q: want the new occurrence", lines[2])
	}
}

func TestFlushWritesPendingCounts(t *testing.T) {
	var buf bytes.Buffer
	l := New(slog.New(slog.NewTextHandler(&buf, nil)), time.Minute)
	clock := time.Unix(1000, 0)
	l.now = func() time.Time { return clock }
	l.Warn("throttled")
	clock = clock.Add(10 * time.Second)
	l.Warn("throttled")
	l.Flush()
	if strings.Count(buf.String(), "\n") != 1 {
		t.Fatalf("flush before the interval ended wrote a summary:\n%s", buf.String())
	}
	clock = clock.Add(time.Minute)
	l.Flush()
	// The span ends at the last occurrence, not now: the condition may be over.
	if !strings.Contains(buf.String(), "repeated=1 over=10s") {
		t.Fatalf("flush lost the count or overstated its span:\n%s", buf.String())
	}
	l.Info("other")
	if !strings.Contains(buf.String(), "msg=other") {
		t.Fatal("a different message was not logged at once")
	}
}

// A condition that is over (the phase moved on, the daemon exits) is
// summarized once, marked as the last, and a new occurrence is a new
// condition, logged at once.
func TestEndWritesTheLastSummary(t *testing.T) {
	var buf bytes.Buffer
	l := New(slog.New(slog.NewTextHandler(&buf, nil)), time.Minute)
	clock := time.Unix(1000, 0)
	l.now = func() time.Time { return clock }
	for range 5 {
		l.Info("contract: waiting for approval")
		clock = clock.Add(time.Second)
	}
	l.Info("sync: waiting for the stream")
	l.End("contract: waiting for approval")
	out := buf.String()
	if !strings.Contains(out, `msg="contract: waiting for approval (repeated; last summary, the condition is over)" repeated=4 over=4s`) {
		t.Fatalf("no last summary of the ended condition:\n%s", out)
	}
	if strings.Count(out, "\n") != 3 {
		t.Fatalf("End wrote more than the last summary of its message:\n%s", out)
	}
	l.Info("contract: waiting for approval")
	if strings.Count(buf.String(), "\n") != 4 {
		t.Fatalf("after End, the message was not logged at once:\n%s", buf.String())
	}
	l.End()
	l.End()
	if strings.Count(buf.String(), "\n") != 4 {
		t.Fatalf("End with nothing pending wrote a line:\n%s", buf.String())
	}
	if n := l.Forget("sync: waiting for the stream"); n != 0 {
		t.Fatalf("Forget after End found %d pending", n)
	}
}
