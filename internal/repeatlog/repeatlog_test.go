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
	l.Warn("throttled")
	l.Warn("throttled")
	l.Flush(false)
	if strings.Count(buf.String(), "\n") != 1 {
		t.Fatalf("flush before the interval ended wrote a summary:\n%s", buf.String())
	}
	l.Flush(true)
	if !strings.Contains(buf.String(), "repeated=1") {
		t.Fatalf("forced flush lost the count:\n%s", buf.String())
	}
	l.Info("other")
	if !strings.Contains(buf.String(), "msg=other") {
		t.Fatal("a different message was not logged at once")
	}
}
