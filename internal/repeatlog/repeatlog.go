// Package repeatlog keeps a daemon's log readable when a condition repeats:
// the first occurrence of a message is logged at once, later ones are
// counted, and each interval ends with one line that says how many times
// it happened, with the last occurrence's attributes.
//
// Invariant: a message is never silently dropped: every occurrence is
// either logged or counted in the next summary line (at the next
// occurrence after the interval, at Flush, or at End), or accounted for by
// the caller's own closing line (Forget). A summary never
// passes for the present when the condition is over: the one End writes
// says it is the last, and its span ends at the last occurrence.
package repeatlog

import (
	"context"
	"log/slog"
	"slices"
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
	last  time.Time // the last occurrence
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
		e.level, e.args, e.last = level, args, now
		l.mu.Unlock()
		return
	}
	var pending *entry
	if ok && e.count > 0 {
		c := *e
		pending = &c
	}
	l.seen[msg] = &entry{level: level, since: now, last: now}
	l.mu.Unlock()
	if pending != nil {
		l.summary(msg, pending)
	}
	l.log.Log(context.Background(), level, msg, args...)
}

// Flush writes the summary of every message whose interval has ended with
// occurrences not logged; call it now and then, while the conditions may
// still hold.
func (l *Log) Flush() {
	l.mu.Lock()
	now := l.now()
	var out []due
	for msg, e := range l.seen {
		if e.count > 0 && now.Sub(e.since) >= l.every {
			out = append(out, due{msg, *e})
			e.count, e.since = 0, now
		}
	}
	l.mu.Unlock()
	for _, d := range out {
		l.summary(d.msg, &d.e)
	}
}

// End says the conditions of msgs (none: of every message) are over: the
// phase moved on, the throttle released, the daemon exits. Their pending
// counts are written at once as the last summary, spanning up to the last
// occurrence, and the messages are forgotten, so the next occurrence is
// logged at once as a new condition.
func (l *Log) End(msgs ...string) {
	l.mu.Lock()
	var out []due
	for msg, e := range l.seen {
		if len(msgs) > 0 && !slices.Contains(msgs, msg) {
			continue
		}
		if e.count > 0 {
			out = append(out, due{msg, *e})
		}
		delete(l.seen, msg)
	}
	l.mu.Unlock()
	slices.SortFunc(out, func(a, b due) int { return a.e.last.Compare(b.e.last) })
	for _, d := range out {
		args := append([]any{"repeated", d.e.count, "over", d.e.last.Sub(d.e.since).Round(time.Second), "last_at", d.e.last.Format(time.RFC3339)}, d.e.args...)
		l.log.Log(context.Background(), d.e.level, d.msg+" (repeated; last summary, the condition is over)", args...)
	}
}

// Forget drops msg and its pending count, for a caller whose own line
// accounts for the whole condition as it ends (a throttle's "released,
// after 3m"); the next occurrence is logged at once. It returns the count
// dropped.
func (l *Log) Forget(msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	if e, ok := l.seen[msg]; ok {
		n = e.count
	}
	delete(l.seen, msg)
	return n
}

type due struct {
	msg string
	e   entry
}

// summary spans the interval up to the last occurrence, not up to now: the
// condition may have ended since.
func (l *Log) summary(msg string, e *entry) {
	args := append([]any{"repeated", e.count, "over", e.last.Sub(e.since).Round(time.Second)}, e.args...)
	l.log.Log(context.Background(), e.level, msg+" (repeated)", args...)
}
