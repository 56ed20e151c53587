package dbconn

import (
	"errors"
	"net/url"
	"regexp"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// redactMask replaces every password RedactDSN finds.
const redactMask = "xxxxx"

// RedactDSN returns the DSN with any password replaced by "xxxxx": the
// userinfo password and the password= / sslpassword= query parameters of the
// URL form (postgres://u:pw@h/db?password=pw), and password= / sslpassword=
// of the keyword/value form (host=h password=pw or password='p w'). It is
// best effort on malformed input and errs on the side of masking too much.
func RedactDSN(dsn string) string {
	s, _ := redactDSN(dsn)
	return s
}

// kvPassword matches a password in the keyword/value form: a quoted value
// (with \' and \\ escapes), an unterminated quoted value (to the end), or a
// bare word.
var kvPassword = regexp.MustCompile(`(?i)\b((?:ssl)?password)(\s*=\s*)('(?:[^'\\]|\\.)*'|'.*$|\S*)`)

// redactDSN returns the redacted DSN and the secrets it masked (as written
// and decoded), so that other text echoing them can be cleaned too.
func redactDSN(dsn string) (string, []string) {
	var secrets []string
	addSecret := func(raw string, decoded ...string) {
		for _, s := range append([]string{raw}, decoded...) {
			if s != "" {
				secrets = append(secrets, s)
			}
		}
	}

	lower := strings.ToLower(dsn)
	prefix := ""
	for _, p := range []string{"postgresql://", "postgres://"} {
		if strings.HasPrefix(lower, p) {
			prefix = dsn[:len(p)]
			break
		}
	}
	if prefix == "" {
		out := kvPassword.ReplaceAllStringFunc(dsn, func(m string) string {
			sub := kvPassword.FindStringSubmatch(m)
			v := sub[3]
			unq := v
			if strings.HasPrefix(v, "'") {
				unq = strings.TrimSuffix(strings.TrimPrefix(v, "'"), "'")
				unq = strings.NewReplacer(`\'`, `'`, `\\`, `\`).Replace(unq)
			}
			addSecret(v, unq)
			return sub[1] + sub[2] + redactMask
		})
		return out, sortSecrets(secrets)
	}

	var b strings.Builder
	b.WriteString(prefix)
	rest := dsn[len(prefix):]

	// Userinfo: like libpq and pgx, the first '@' before any '/' ends it; a
	// password holding an unencoded '@' is covered by extending to the last
	// '@' before the next '/'.
	if i := strings.IndexAny(rest, "@/"); i >= 0 && rest[i] == '@' {
		end := i
		after := rest[i+1:]
		if j := strings.IndexByte(after, '/'); j >= 0 {
			after = after[:j]
		}
		if k := strings.LastIndexByte(after, '@'); k >= 0 {
			end = i + 1 + k
		}
		userinfo := rest[:end]
		if user, pw, ok := strings.Cut(userinfo, ":"); ok {
			addSecret(pw, decodeLenient(pw))
			b.WriteString(user + ":" + redactMask)
		} else {
			b.WriteString(userinfo)
		}
		b.WriteByte('@')
		rest = rest[end+1:]
	} else if at := strings.IndexByte(rest, '@'); at >= 0 {
		// Malformed: a password with an unencoded '/' strands the '@'
		// (postgres://user:pass/word@host). Mask ":...@" unless the '@'
		// sits in the query.
		before := rest[:at]
		if c := strings.IndexByte(before, ':'); c >= 0 && !strings.Contains(before, "?") {
			pw := before[c+1:]
			addSecret(pw, decodeLenient(pw))
			b.WriteString(before[:c+1] + redactMask + "@")
			rest = rest[at+1:]
		}
	}

	q := strings.IndexByte(rest, '?')
	if q < 0 {
		b.WriteString(rest)
		return b.String(), sortSecrets(secrets)
	}
	b.WriteString(rest[:q+1])
	for i, pair := range strings.Split(rest[q+1:], "&") {
		if i > 0 {
			b.WriteByte('&')
		}
		k, v, ok := strings.Cut(pair, "=")
		switch strings.ToLower(strings.TrimSpace(decodeLenient(k))) {
		case "password", "sslpassword":
			if ok {
				addSecret(v, decodeLenient(v))
				b.WriteString(k + "=" + redactMask)
				continue
			}
		}
		b.WriteString(pair)
	}
	return b.String(), sortSecrets(secrets)
}

func decodeLenient(s string) string {
	if d, err := url.PathUnescape(s); err == nil {
		return d
	}
	return s
}

// sortSecrets puts longer secrets first so that replacing them in text never
// leaves the tail of a longer one that contains a shorter one.
func sortSecrets(s []string) []string {
	sort.SliceStable(s, func(i, j int) bool { return len(s[i]) > len(s[j]) })
	return s
}

// CheckDSN parses dsn with pgconn and, when that fails, says why without
// echoing any password: pgconn's message quotes the connection string, so
// the reason is cut out of it and scrubbed of every secret RedactDSN finds.
func CheckDSN(dsn string) string {
	_, err := pgconn.ParseConfig(dsn)
	if err == nil {
		return ""
	}
	return scrubDSNError(dsn, err)
}

func scrubDSNError(dsn string, err error) string {
	msg := err.Error()
	var pe *pgconn.ParseConfigError
	if errors.As(err, &pe) {
		// "cannot parse `<dsn, best-effort redacted>`: <reason>"
		const head = "cannot parse `"
		if strings.HasPrefix(msg, head) {
			if i := strings.LastIndex(msg, "`: "); i >= len(head) {
				msg = msg[i+len("`: "):]
			}
		}
	}
	redacted, secrets := redactDSN(dsn)
	if dsn != "" {
		msg = strings.ReplaceAll(msg, dsn, redacted)
	}
	for _, s := range secrets {
		msg = strings.ReplaceAll(msg, s, redactMask)
	}
	return msg
}
