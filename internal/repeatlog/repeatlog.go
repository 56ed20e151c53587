// Package repeatlog keeps a daemon's log readable when a condition repeats:
// the first occurrence of a message is logged at once, later ones are
// counted, and each interval ends with one line that says how many times
// it happened, with the last occurrence's attributes.
//
// Invariant: a message is never silently dropped: every occurrence is
// either logged or counted in the next summary line (at the next
// occurrence after the interval, or at Flush).
package repeatlog

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Log summarizes repeated messages of one logger. Safe for concurrent use.
type Log struct {
	log   *slog.Logger
	every time.Duration
	now   func() time.Time

	mu   sync.Mutex
	seen map[string]*entry
}

type entry struct {
	level slog.Level
	since time.Time // when the interval began (the last line logged)
	count int       // occurrences since, not logged
	args  []any     // of the last of them
}

// DefaultInterval is how often a repeating message is summarized.
const DefaultInterval = 30 * time.Second

// New returns a Log writing to log, summarizing every interval (0:
// DefaultInterval).
func New(log *slog.Logger, interval time.Duration) *Log {
	if interval <= 0 {
		interval = DefaultInterval
	}
	return &Log{log: log, every: interval, now: time.Now, seen: map[string]*entry{}}
}

// Info, Warn and Error log msg, or count it when it was logged less than an
// interval ago. The message text is the key: put what varies in args.
func (l *Log) Info(msg string, args ...any)  { l.add(slog.LevelInfo, msg, args) }
func (l *Log) Warn(msg string, args ...any)  { l.add(slog.LevelWarn, msg, args) }
func (l *Log) Error(msg string, args ...any) { l.add(slog.LevelError, msg, args) }

func (l *Log) add(level slog.Level, msg string, args []any) {
	l.mu.Lock()
	now := l.now()
	e, ok := l.seen[msg]
	if ok && now.Sub(e.since) < l.every {
		e.count++
		e.level, e.args = level, args
		l.mu.Unlock()
		return
	}
	var pending *entry
	if ok && e.count > 0 {
		c := *e
		pending = &c
	}
	l.seen[msg] = &entry{level: level, since: now}
	l.mu.Unlock()
	if pending != nil {
		l.summary(msg, pending, now)
	}
	l.log.Log(context.Background(), level, msg, args...)
}

// Flush writes the summary of every message whose interval has ended with
// occurrences not logged; call it now and then (and at exit with force).
func (l *Log) Flush(force bool) {
	l.mu.Lock()
	now := l.now()
	type due struct {
		msg string
		e   entry
	}
	var out []due
	for msg, e := range l.seen {
		if e.count > 0 && (force || now.Sub(e.since) >= l.every) {
			out = append(out, due{msg, *e})
			e.count, e.since = 0, now
		}
	}
	l.mu.Unlock()
	for _, d := range out {
		l.summary(d.msg, &d.e, now)
	}
}

func (l *Log) summary(msg string, e *entry, now time.Time) {
	args := append([]any{"repeated", e.count, "over", now.Sub(e.since).Round(time.Second)}, e.args...)
	l.log.Log(context.Background(), e.level, msg+" (repeated)", args...)
}
