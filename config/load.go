package config

import (
	"errors"
	"fmt"
	"math"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/docker/go-units"
	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
	"go.yaml.in/yaml/v3"
)

// Problem is one thing wrong with a configuration.
type Problem struct {
	Key    string // dotted key ("expand[1]", "columns.first_name" for parts); "" when about the file as a whole or an unknown key
	Msg    string // what is wrong and what is expected
	Source string // where the value came from: "file.yaml:12", "env CDCBACKFILL_X", "flag --x"; may be ""
}

func (p Problem) String() string {
	var b strings.Builder
	b.WriteString("config: ")
	if p.Key != "" {
		b.WriteString(p.Key + ": ")
	}
	b.WriteString(p.Msg)
	if p.Source != "" {
		b.WriteString(" (" + p.Source + ")")
	}
	return b.String()
}

// Error is every problem Load or Validate found, one per line.
type Error struct {
	Problems []Problem
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// Load reads the YAML file at path (path may be "" => only env + flags),
// overlays environment variables (EnvVar) and then the flags of fs that were
// set (fs may be nil; only flags named after a key, e.g. "database.dsn",
// count), fills defaults, decodes and validates.
//
// A file that cannot be read or is not YAML gives a plain error naming the
// file (wrapping the os error, so errors.Is(err, fs.ErrNotExist) works);
// every other problem is reported together in an *Error, one per line.
//
// Environment and flag values are text. For expand/contract/rollback the
// text is a YAML list (`["stmt 1", "stmt 2"]`) or else one statement; for
// columns it is a YAML/JSON mapping (`{first_name: "split_part(...)"}`); a
// list-valued flag (pflag StringArray) gives one statement per item, or one
// NAME=EXPRESSION per item for columns. An empty variable is a value: empty
// http.listen disables the HTTP server, empty contract clears it.
//
// Viper layers defaults < file < env < flags and decodes through
// decodeHook. The walk over the file's YAML nodes (file.go) does what viper
// has no notion of: unknown and repeated keys, file:line positions, and
// column names as written (viper lowercases map keys).
func Load(path string, fs *pflag.FlagSet) (*Config, error) {
	l := &loader{path: path, fs: fs, lines: map[string]int{}, seen: map[string]int{}}
	v := newViper()
	v.AllowEmptyEnv(true)
	for _, k := range keys {
		_ = v.BindEnv(k.name, EnvVar(k.name)) // errs only without a name
		// Only flags that were set: viper falls back on an unset flag's default.
		if f := l.flag(k.name); f != nil && f.Changed {
			_ = v.BindPFlag(k.name, f) // errs only on a nil flag
		}
	}
	if path != "" {
		values, err := l.readFile(path)
		if err != nil {
			return nil, err
		}
		_ = v.MergeConfigMap(values) // never errs
	}
	c, ps := decode(v)
	failed := map[string]bool{} // a key that could not be decoded is not validated
	for _, p := range ps {
		failed[rootKey(p.Key)] = true
	}
	for _, p := range c.problems() {
		if !failed[rootKey(p.Key)] {
			ps = append(ps, p)
		}
	}
	if ps = append(l.problems, ps...); len(ps) == 0 {
		return c, nil
	}
	for i := range ps {
		if ps[i].Source == "" {
			ps[i].Source = l.source(ps[i].Key)
		}
	}
	sortProblems(ps)
	return nil, &Error{Problems: ps}
}

// newViper is a viper holding the defaults.
func newViper() *viper.Viper {
	v := viper.New()
	for _, k := range keys {
		if def := k.tag.Get("default"); def != "" {
			v.SetDefault(k.name, def)
		}
	}
	return v
}

// decode unmarshals what v holds into a Config, with a problem for each
// value that cannot be read. Strings are trimmed, and lower-cased when
// their check is a choice.
func decode(v *viper.Viper) (*Config, []Problem) {
	c := &Config{}
	err := v.Unmarshal(c, viper.DecodeHook(mapstructure.DecodeHookFuncValue(decodeHook)))
	for _, k := range keys {
		if f := reflect.ValueOf(c).Elem().FieldByIndex(k.index); f.Kind() == reflect.String {
			s := strings.TrimSpace(f.String())
			if strings.Contains(k.tag.Get("check"), "|") {
				s = strings.ToLower(s)
			}
			f.SetString(s)
		}
	}
	return c, decodeProblems(err)
}

// fault is decodeHook's error: msg, or else "must be <the key's want>, got
// <got>"; sub names the part of the value at fault ("[1]", ".first_name").
type fault struct{ sub, msg, got string }

func (f *fault) Error() string { return f.msg + f.got }

// decodeProblems turns Unmarshal's error, every field's error joined, into
// problems.
func decodeProblems(err error) []Problem {
	var ps []Problem
	switch e := err.(type) {
	case nil:
	case interface{ Unwrap() []error }:
		for _, e := range e.Unwrap() {
			ps = append(ps, decodeProblems(e)...)
		}
	case *mapstructure.DecodeError:
		p := Problem{Key: e.Name(), Msg: e.Unwrap().Error()}
		if f, ok := e.Unwrap().(*fault); ok {
			p.Key, p.Msg = p.Key+f.sub, f.msg
			if k, ok := findKey(p.Key); ok && f.msg == "" {
				p.Msg = fmt.Sprintf("must be %s, got %s", k.want(), f.got)
			}
		}
		ps = append(ps, p)
	case interface{ Unwrap() error }: // "decoding failed due to the following error(s)"
		ps = decodeProblems(e.Unwrap())
	default:
		ps = append(ps, Problem{Msg: err.Error()})
	}
	return ps
}

// decodeHook reads a value as the type of its field. A value is a YAML node
// (from the file), text (the environment, a flag, a default), or the items
// of a list-valued flag.
func decodeHook(from, to reflect.Value) (any, error) {
	data := from.Interface()
	switch to.Type() {
	case statementsType:
		return statements(data)
	case slotNamesType:
		v, err := list(data, "slot names", "a slot name")
		if l, ok := v.([]string); ok {
			return SlotNames(l), err
		}
		return v, err
	case columnsType:
		return columns(data)
	}
	text, ok := data.(string)
	if n, isNode := data.(*yaml.Node); isNode {
		if n.Kind != yaml.ScalarNode {
			return nil, &fault{got: describe(n)}
		}
		text, ok = n.Value, true
	}
	if !ok {
		return data, nil
	}
	t := strings.TrimSpace(text)
	var v any
	var err error
	switch to.Type() {
	case durationType:
		v, err = time.ParseDuration(t) // needs a unit, except "0"
	case sizeType:
		if v, err = ParseSize(t); err != nil {
			return nil, &fault{msg: err.Error()}
		}
	case reflect.TypeOf(0):
		v, err = strconv.Atoi(t)
	case reflect.TypeOf(0.0):
		f, e := strconv.ParseFloat(t, 64)
		if e == nil && (math.IsNaN(f) || math.IsInf(f, 0)) {
			e = errors.New("not a finite number")
		}
		v, err = f, e
	default:
		return text, nil
	}
	if err != nil {
		return nil, &fault{got: strconv.Quote(text)}
	}
	return v, nil
}

// statements reads a list of SQL statements: a YAML list, or the text of an
// environment variable or flag (a YAML list, or else one statement; empty
// is none), or the items of a list-valued flag.
func statements(data any) (any, error) {
	return list(data, "SQL statements", "a SQL statement")
}

// list reads a list of strings (what: "SQL statements", item: "a SQL
// statement"), as statements says.
func list(data any, what, item string) (any, error) {
	switch x := data.(type) {
	case []string:
		return x, nil
	case SlotNames:
		return []string(x), nil
	case string:
		if strings.TrimSpace(x) == "" {
			return []string{}, nil
		}
		if n := parseYAML(x); n != nil && n.Kind == yaml.SequenceNode {
			return list(n, what, item)
		}
		return []string{x}, nil
	}
	n, ok := data.(*yaml.Node)
	if !ok {
		return data, nil
	}
	if n.Kind != yaml.SequenceNode {
		return nil, &fault{msg: fmt.Sprintf("must be a list of %s (a YAML list, one per item), got %s", what, describe(n))}
	}
	out := make([]string, len(n.Content))
	for i, it := range n.Content {
		switch it = deref(it); {
		case isNull(it):
		case it.Kind == yaml.ScalarNode:
			out[i] = it.Value
		default:
			return nil, &fault{sub: fmt.Sprintf("[%d]", i), msg: fmt.Sprintf(`must be %s (a string), got %s; quote items that contain ": "`, item, describe(it))}
		}
	}
	return out, nil
}

// columns reads the columns mapping, sorted by name: a YAML mapping, or the
// text of an environment variable or flag (a YAML or JSON mapping; empty is
// none), or the NAME=EXPRESSION items of a list-valued flag. Column names
// keep the case written, so that "First_Name" is reported, not renamed.
func columns(data any) (any, error) {
	var cols []Column
	n, _ := data.(*yaml.Node)
	switch x := data.(type) {
	case []string:
		for _, it := range x {
			name, expr, ok := strings.Cut(it, "=")
			if !ok {
				return nil, &fault{msg: fmt.Sprintf("each item must be NAME=EXPRESSION, got %q", it)}
			}
			cols = append(cols, Column{Name: strings.TrimSpace(name), Expr: expr})
		}
	case string:
		if strings.TrimSpace(x) == "" {
			return cols, nil
		}
		if n = parseYAML(x); n == nil || n.Kind != yaml.MappingNode {
			return nil, &fault{msg: fmt.Sprintf(`must be %s written as YAML or JSON, such as {first_name: "split_part(full_name, ' ', 1)"}, got %q`, wantColumns, x)}
		}
	case *yaml.Node:
		if n.Kind != yaml.MappingNode {
			return nil, &fault{msg: fmt.Sprintf("must be %s, got %s", wantColumns, describe(n))}
		}
	default:
		return data, nil
	}
	for i := 0; n != nil && i+1 < len(n.Content); i += 2 {
		kn, vn := deref(n.Content[i]), deref(n.Content[i+1])
		if kn.Kind != yaml.ScalarNode || isNull(kn) {
			return nil, &fault{msg: "column names must be plain names, got " + describe(kn)}
		}
		col := Column{Name: kn.Value}
		switch {
		case isNull(vn):
		case vn.Kind == yaml.ScalarNode:
			col.Expr = vn.Value
		default:
			return nil, &fault{sub: "." + kn.Value, msg: "must be a SQL expression (a string), got " + describe(vn)}
		}
		cols = append(cols, col)
	}
	sort.SliceStable(cols, func(i, j int) bool { return cols[i].Name < cols[j].Name })
	return cols, nil
}

// sizeRE is a number and a unit; the units ParseSize knows are B and the
// 1024-based K, M, G, T with an optional B or iB. go-units reads those and
// more (1e9, 1.5 bytes, P), which ParseSize refuses.
var (
	sizeRE      = regexp.MustCompile(`^([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)$`)
	sizeUnitsRE = regexp.MustCompile(`(?i)^(b|[kmgt](i?b)?)$`)
)

// ParseSize parses a byte size: a plain integer of bytes, or a number with a
// unit B, kB, MB, GB, TB or KiB, MiB, GiB, TiB (any case; kB/MB/GB/TB are
// 1024-based like PostgreSQL's). "0" is zero. The error reads
// `must be a size such as 1GB or 512MB, got "lots"`.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	m := sizeRE.FindStringSubmatch(t)
	bytes := m != nil && (m[2] == "" || strings.EqualFold(m[2], "b"))
	switch {
	case m == nil && strings.HasPrefix(t, "-") && sizeRE.MatchString(t[1:]):
		return 0, fmt.Errorf("must not be negative (0 means no cap), got %q", s)
	case m == nil:
		return 0, fmt.Errorf("must be %s, got %q", wantSize, s)
	case m[2] != "" && !sizeUnitsRE.MatchString(m[2]):
		return 0, fmt.Errorf("must be %s (units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), got %q", wantSize, s)
	case bytes && strings.Contains(m[1], "."):
		return 0, fmt.Errorf("must be a whole number of bytes or use a unit such as MB, got %q", s)
	}
	n, err := units.RAMInBytes(m[1] + m[2]) // through a float64: exact below 2^53 bytes, and a multiple of 1024 is
	if bytes {
		n, err = strconv.ParseInt(m[1], 10, 64)
	}
	if err != nil || n < 0 || n == math.MaxInt64 && !bytes { // a float64 past int64: MinInt64 on amd64, MaxInt64 on arm64
		return 0, fmt.Errorf("is too large, got %q", s)
	}
	return n, nil
}

// loader is what Load knows of the file, for errors.
type loader struct {
	path     string
	fs       *pflag.FlagSet
	lines    map[string]int // key, list item or column as written -> its line in the file
	seen     map[string]int // key in the file (lower-cased) -> line
	problems []Problem      // found in the file's structure
}

// source says where the value of key (or of a part of it) came from, in
// viper's order: "flag --x" when set on the command line, "env X",
// "file.yaml:12", or "" for the default.
func (l *loader) source(key string) string {
	root := rootKey(key)
	if f := l.flag(root); f != nil && f.Changed {
		return "flag --" + root
	}
	if _, ok := os.LookupEnv(EnvVar(root)); ok {
		return "env " + EnvVar(root)
	}
	if line, ok := l.lines[key]; ok {
		return l.at(line)
	}
	if line, ok := l.lines[root]; ok {
		return l.at(line)
	}
	return ""
}

func (l *loader) flag(name string) *pflag.Flag {
	if l.fs == nil {
		return nil
	}
	return l.fs.Lookup(name)
}

func (l *loader) at(line int) string {
	if line <= 0 {
		return l.path
	}
	return fmt.Sprintf("%s:%d", l.path, line)
}

// rootKey is the config key a problem key ("expand[1]", "columns.a") is
// about, or the problem key itself.
func rootKey(p string) string {
	for _, k := range keys {
		if p == k.name || strings.HasPrefix(p, k.name+".") || strings.HasPrefix(p, k.name+"[") {
			return k.name
		}
	}
	return p
}

// sortProblems puts problems about the file's structure (unknown keys) first,
// then the others in key order (a section before its keys), keeping the
// order within a key.
func sortProblems(ps []Problem) {
	order := func(p Problem) int {
		root := rootKey(p.Key)
		for i, k := range keys {
			if p.Key != "" && (k.name == root || strings.HasPrefix(k.name, p.Key+".")) {
				return i
			}
		}
		return -1
	}
	sort.SliceStable(ps, func(i, j int) bool { return order(ps[i]) < order(ps[j]) })
}
