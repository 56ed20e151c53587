package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"
	"go.yaml.in/yaml/v3"
)

// EnvPrefix starts every environment variable Load reads:
// EnvPrefix + the dotted key upper-cased with "." turned into "_".
const EnvPrefix = "CDCBACKFILL_"

type kind int

const (
	kindString kind = iota
	kindEnum        // a string, lower-cased on load
	kindInt
	kindFloat
	kindDuration
	kindSize
	kindList    // list of SQL statements
	kindColumns // map column name -> SQL expression
)

// What a good value looks like, shared by the decoder and Validate.
const (
	wantPositiveInt  = "a positive integer"
	wantNonNegInt    = "an integer >= 0"
	wantWorkers      = "an integer from 1 to 64"
	wantNonNegNumber = "a number >= 0"
	wantDuration     = "a duration such as 200ms or 2m"
	wantSize         = "a size such as 1GB or 512MB"
	wantList         = "a list of SQL statements"
	wantColumns      = "a mapping of new column name to SQL expression"
)

type keySpec struct {
	key  string
	kind kind
	def  string // default, parsed like any other value; "" = none
	want string // for int and float keys
}

// keySpecs is every known key, in the order of DESIGN.md; errors are listed
// in this order too.
var keySpecs = []keySpec{
	{key: "name", kind: kindString},
	{key: "database.dsn", kind: kindString},
	{key: "table", kind: kindString},
	{key: "expand", kind: kindList},
	{key: "columns", kind: kindColumns},
	{key: "contract", kind: kindList},
	{key: "rollback", kind: kindList},
	{key: "backfill.batch_size", kind: kindInt, def: "5000", want: wantPositiveInt},
	{key: "backfill.target_batch_time", kind: kindDuration, def: "200ms"},
	{key: "backfill.sleep", kind: kindDuration, def: "10ms"},
	{key: "backfill.max_rows_per_second", kind: kindFloat, def: "0", want: wantNonNegNumber},
	{key: "backfill.workers", kind: kindInt, def: "1", want: wantWorkers},
	{key: "throttle.max_replica_lag", kind: kindDuration, def: "10s"},
	{key: "throttle.max_slot_lag", kind: kindSize, def: "1GB"},
	{key: "sync.flush_interval", kind: kindDuration, def: "50ms"},
	{key: "sync.max_batch_keys", kind: kindInt, def: "5000", want: wantPositiveInt},
	{key: "dual_write.detect", kind: kindEnum, def: "manual"},
	{key: "dual_write.quiet_period", kind: kindDuration, def: "2m"},
	{key: "dual_write.min_evidence", kind: kindInt, def: "1000", want: wantPositiveInt},
	{key: "contract_policy.mode", kind: kindEnum, def: "manual"},
	{key: "contract_policy.hold", kind: kindDuration, def: "10m"},
	{key: "contract_policy.lock_timeout", kind: kindDuration, def: "500ms"},
	{key: "contract_policy.catchup_timeout", kind: kindDuration, def: "1s"},
	{key: "ddl.lock_timeout", kind: kindDuration, def: "2s"},
	{key: "ddl.max_retries", kind: kindInt, def: "30", want: wantNonNegInt},
	{key: "http.listen", kind: kindString, def: "127.0.0.1:9187"},
	{key: "log.level", kind: kindEnum, def: "info"},
	{key: "log.format", kind: kindEnum, def: "text"},
}

var (
	specByKey = map[string]keySpec{}
	keyOrder  = map[string]int{}
	sections  = map[string][]string{} // section -> its child names ("" = top level)
)

func init() {
	for i, s := range keySpecs {
		specByKey[s.key] = s
		keyOrder[s.key] = i
		parent, child := "", s.key
		if j := strings.LastIndexByte(s.key, '.'); j >= 0 {
			parent, child = s.key[:j], s.key[j+1:]
		}
		sections[parent] = append(sections[parent], child)
		if parent != "" && !contains(sections[""], parent) {
			sections[""] = append(sections[""], parent)
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Keys lists every known dotted key (for binding flags / docs), in the order
// of DESIGN.md. "columns" is one key: its value is a whole map.
func Keys() []string {
	out := make([]string, len(keySpecs))
	for i, s := range keySpecs {
		out[i] = s.key
	}
	return out
}

// EnvVar is the environment variable that overrides key, e.g.
// "backfill.batch_size" -> "CDCBACKFILL_BACKFILL_BATCH_SIZE".
func EnvVar(key string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// DefaultValue is the default of key as a string ("" when it has none), for
// flag help and docs.
func DefaultValue(key string) string { return specByKey[key].def }

// Default returns a Config with every default of DESIGN.md filled in and
// nothing else (no name, DSN, table or columns).
func Default() *Config {
	c := &Config{}
	for _, s := range keySpecs {
		if s.def == "" {
			continue
		}
		if p := decodeScalar(c, s, s.def); p != nil {
			panic("config: bad default for " + s.key + ": " + p.Msg)
		}
	}
	return c
}

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

// fileValue is one known key as written in the file.
type fileValue struct {
	node *yaml.Node
	line int // of the key
}

type loader struct {
	path     string
	file     map[string]fileValue // known key -> its value in the file
	fileSeen map[string]int       // key as written in the file -> line
	problems []Problem
	failed   map[string]bool   // keys whose value could not be decoded
	srcs     map[string]string // problem key -> source
}

// Load reads the YAML file at path (path may be "" => only env + flags),
// overlays environment variables CDCBACKFILL_<PATH> (e.g.
// CDCBACKFILL_DATABASE_DSN, CDCBACKFILL_BACKFILL_BATCH_SIZE,
// CDCBACKFILL_NAME), then flags that were explicitly set in fs (fs may be
// nil; flag names are the dotted key paths, e.g. "database.dsn",
// "backfill.batch_size"; only fs flags whose name matches a known key are
// bound), fills defaults, decodes and validates.
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
// Viper does the layering (defaults < file < env < flags), so precedence is
// viper's; a walk over the file's yaml.v3 nodes does the strictness viper
// has no notion of: unknown and repeated keys, file:line positions, and
// column names as written (viper lowercases map keys).
func Load(path string, fs *pflag.FlagSet) (*Config, error) {
	l := &loader{
		path:     path,
		file:     map[string]fileValue{},
		fileSeen: map[string]int{},
		failed:   map[string]bool{},
		srcs:     map[string]string{},
	}
	v, err := newViper(fs)
	if err != nil {
		return nil, err
	}
	if path != "" {
		data, err := l.readFile(path)
		if err != nil {
			return nil, err
		}
		if err := v.ReadConfig(bytes.NewReader(data)); err != nil {
			// yaml.v3 refuses as a whole some documents the walk reports on
			// key by key (a key set twice, a key that is not a name, a top
			// level that is not a mapping): give viper the known keys the
			// walk found, so every other problem is still reported.
			if err := v.MergeConfigMap(l.fileMap()); err != nil {
				return nil, fmt.Errorf("config: %s: %w", path, err)
			}
		}
	}

	// Start from the defaults: viper hides a default under a file section
	// that is not a mapping ("backfill: 10"), which the walk has reported.
	c := Default()
	for _, s := range keySpecs {
		if !v.IsSet(s.key) {
			continue
		}
		src, node := l.source(s.key, fs)
		l.srcs[s.key] = src
		if p := decodeValue(c, s, v.Get(s.key), node, l.itemSource(src, node != nil)); p != nil {
			p.Source = firstNonEmpty(l.srcs[p.Key], src)
			l.problems = append(l.problems, *p)
			l.failed[s.key] = true
		}
	}
	if len(c.Columns) > 0 {
		sort.SliceStable(c.Columns, func(i, j int) bool { return c.Columns[i].Name < c.Columns[j].Name })
	}
	for _, p := range c.problems() {
		root := rootKey(p.Key)
		if l.failed[root] {
			continue
		}
		p.Source = firstNonEmpty(l.srcs[p.Key], l.srcs[root])
		l.problems = append(l.problems, p)
	}
	if len(l.problems) > 0 {
		sortProblems(l.problems)
		return nil, &Error{Problems: l.problems}
	}
	return c, nil
}

// newViper makes the viper that layers defaults, file, env and flags for
// every known key. The file is read into it by Load.
func newViper(fs *pflag.FlagSet) (*viper.Viper, error) {
	v := viper.New()
	v.SetConfigType("yaml")
	v.SetEnvPrefix(strings.TrimSuffix(EnvPrefix, "_"))
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AllowEmptyEnv(true) // an empty variable is a value (empty http.listen disables)
	for _, s := range keySpecs {
		if err := v.BindEnv(s.key); err != nil { // CDCBACKFILL_ + key, "." -> "_", upper-cased: EnvVar(key)
			return nil, fmt.Errorf("config: %s: %w", s.key, err)
		}
		if s.def != "" {
			v.SetDefault(s.key, s.def)
		}
		if fs == nil {
			continue
		}
		if f := fs.Lookup(s.key); f != nil {
			if err := v.BindPFlag(s.key, f); err != nil {
				return nil, fmt.Errorf("config: flag --%s: %w", s.key, err)
			}
		}
	}
	return v, nil
}

// source says which layer viper takes key's value from, in viper's order
// (a changed flag, then the environment, then the file, then the default),
// for error messages: "flag --x", "env X", "file.yaml:12" or "" for the
// default. node is the key's YAML node when the value is the file's.
func (l *loader) source(key string, fs *pflag.FlagSet) (string, *yaml.Node) {
	if fs != nil {
		if f := fs.Lookup(key); f != nil && f.Changed {
			return "flag --" + key, nil
		}
	}
	if _, ok := os.LookupEnv(EnvVar(key)); ok {
		return "env " + EnvVar(key), nil
	}
	if fv, ok := l.file[key]; ok && !isNull(fv.node) {
		return l.fileAt(fv.line), fv.node
	}
	return "", nil
}

// fileMap is the known keys the walk found in the file, as the nested maps
// viper holds.
func (l *loader) fileMap() map[string]any {
	m := map[string]any{}
	for key, fv := range l.file {
		parts := strings.Split(key, ".")
		cur := m
		for _, p := range parts[:len(parts)-1] {
			next, ok := cur[p].(map[string]any)
			if !ok {
				next = map[string]any{}
				cur[p] = next
			}
			cur = next
		}
		cur[parts[len(parts)-1]] = nodeValue(fv.node)
	}
	return m
}

func firstNonEmpty(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}

// rootKey maps a problem key to the config key it is part of.
func rootKey(k string) string {
	if strings.HasPrefix(k, "columns.") {
		return "columns"
	}
	if i := strings.IndexByte(k, '['); i >= 0 {
		return k[:i]
	}
	return k
}

// sortProblems puts problems about the file's structure (unknown keys) first,
// then the others in key order, keeping the order within a key.
func sortProblems(ps []Problem) {
	order := func(p Problem) int {
		if p.Key == "" {
			return -1
		}
		if i, ok := keyOrder[rootKey(p.Key)]; ok {
			return i
		}
		if i, ok := keyOrder[p.Key]; ok {
			return i
		}
		// a section ("backfill") goes before its keys
		for i, s := range keySpecs {
			if strings.HasPrefix(s.key, p.Key+".") {
				return i
			}
		}
		return -1
	}
	sort.SliceStable(ps, func(i, j int) bool { return order(ps[i]) < order(ps[j]) })
}

func (l *loader) fileAt(line int) string {
	if line <= 0 {
		return l.path
	}
	return fmt.Sprintf("%s:%d", l.path, line)
}

// itemSource gives the source of one list item or column of a value from
// src: its own line when it came from the file, else src.
func (l *loader) itemSource(src string, inFile bool) func(key string, n *yaml.Node) {
	return func(key string, n *yaml.Node) {
		if inFile && n != nil {
			l.srcs[key] = l.fileAt(n.Line)
		} else {
			l.srcs[key] = src
		}
	}
}

func (l *loader) problem(key, msg, src string) {
	l.problems = append(l.problems, Problem{Key: key, Msg: msg, Source: src})
}

// readFile reads the file, checks it is one YAML document and walks it; it
// returns the file's bytes for viper.
func (l *loader) readFile(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: cannot read config file %q: %w", path, err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return data, nil // empty file
		}
		return nil, fmt.Errorf("config: %s is not valid YAML: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return nil, fmt.Errorf("config: %s is not valid YAML: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
		}
		return nil, fmt.Errorf("config: %s holds more than one YAML document (line %d); write one migration per file", path, extra.Line)
	}
	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return data, nil
		}
		root = root.Content[0]
	}
	root = deref(root)
	if isNull(root) {
		return data, nil
	}
	if root.Kind != yaml.MappingNode {
		l.problem("", fmt.Sprintf("%s: the top level must be a mapping of keys (name, database, table, ...), got %s", path, describe(root)), l.fileAt(root.Line))
		return data, nil
	}
	l.walk("", root)
	return data, nil
}

// walk records the leaves of mapping m (at dotted prefix) and reports unknown
// and repeated keys. Config keys match case-insensitively, as viper does.
func (l *loader) walk(prefix string, m *yaml.Node) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		kn, vn := deref(m.Content[i]), deref(m.Content[i+1])
		at := l.fileAt(kn.Line)
		if kn.Kind != yaml.ScalarNode || isNull(kn) {
			l.problem(prefix, fmt.Sprintf("keys must be plain names, got %s", describe(kn)), at)
			continue
		}
		written := joinKey(prefix, kn.Value)
		full := joinKey(prefix, strings.ToLower(kn.Value)) // viper's key
		if first, ok := l.fileSeen[full]; ok {
			l.problem(full, fmt.Sprintf("is set twice (first at line %d)", first), at)
			continue
		}
		l.fileSeen[full] = kn.Line
		if _, ok := specByKey[full]; ok {
			l.file[full] = fileValue{node: vn, line: kn.Line}
			continue
		}
		if children, ok := sections[full]; ok && full != "" {
			if isNull(vn) {
				continue
			}
			if vn.Kind != yaml.MappingNode {
				l.problem(full, fmt.Sprintf("must be a mapping with the keys %s, got %s", strings.Join(children, ", "), describe(vn)), at)
				continue
			}
			l.walk(full, vn)
			continue
		}
		msg := fmt.Sprintf("unknown key %q", written)
		if s := suggest(full); s != "" {
			msg += fmt.Sprintf("; did you mean %q?", s)
		} else if children := sections[prefix]; len(children) > 0 {
			where := "at the top level"
			if prefix != "" {
				where = "under " + prefix
			}
			msg += fmt.Sprintf("; known keys %s: %s", where, strings.Join(children, ", "))
		}
		l.problem("", msg, at)
	}
}

func joinKey(prefix, name string) string {
	if prefix == "" {
		return name
	}
	return prefix + "." + name
}

// suggest returns the known key or section closest to an unknown key, or "".
func suggest(unknown string) string {
	var cands []string
	for s := range sections {
		if s != "" {
			cands = append(cands, s)
		}
	}
	cands = append(cands, Keys()...)
	sort.Strings(cands)
	norm := func(s string) string { return strings.NewReplacer("_", "", "-", "").Replace(strings.ToLower(s)) }
	last := unknown[strings.LastIndexByte(unknown, '.')+1:]
	best, bestD := "", 3
	for _, c := range cands {
		if norm(c) == norm(unknown) {
			return c
		}
		if d := levenshtein(unknown, c); d < bestD {
			best, bestD = c, d
		}
	}
	if best != "" {
		return best
	}
	// the right key at the wrong level: "batch_size" at the top
	for _, c := range Keys() {
		if strings.Contains(c, ".") && c[strings.LastIndexByte(c, '.')+1:] == last {
			return c
		}
	}
	return ""
}

func levenshtein(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

func strNode(s string) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: s}
}

// textList turns the text of an environment variable or flag into list
// items: a YAML list, or else one statement; empty text is an empty list.
func textList(raw string) []any {
	if strings.TrimSpace(raw) == "" {
		return []any{}
	}
	if n := parseYAMLValue(raw); n != nil && n.Kind == yaml.SequenceNode {
		return nodeValue(n).([]any)
	}
	return []any{raw}
}

// textColumns turns the text of an environment variable or flag into a
// columns mapping node; empty text is an empty mapping.
func textColumns(raw string) (*yaml.Node, string) {
	if strings.TrimSpace(raw) == "" {
		return &yaml.Node{Kind: yaml.MappingNode}, ""
	}
	if n := parseYAMLValue(raw); n != nil && n.Kind == yaml.MappingNode {
		return n, ""
	}
	return nil, fmt.Sprintf(`must be %s written as YAML or JSON, such as {first_name: "split_part(full_name, ' ', 1)"}, got %q`, wantColumns, raw)
}

// itemColumns turns the NAME=EXPRESSION items of a list-valued flag into a
// columns mapping node.
func itemColumns(items []string) (*yaml.Node, string) {
	n := &yaml.Node{Kind: yaml.MappingNode}
	for _, it := range items {
		name, expr, ok := strings.Cut(it, "=")
		if !ok {
			return nil, fmt.Sprintf("each item must be NAME=EXPRESSION, got %q", it)
		}
		n.Content = append(n.Content, strNode(strings.TrimSpace(name)), strNode(expr))
	}
	return n, ""
}

func parseYAMLValue(raw string) *yaml.Node {
	var doc yaml.Node
	if err := yaml.Unmarshal([]byte(raw), &doc); err != nil {
		return nil
	}
	if doc.Kind == yaml.DocumentNode && len(doc.Content) > 0 {
		return deref(doc.Content[0])
	}
	return nil
}

// nodeValue turns n into the plain values viper holds (nil, string, []any,
// map[string]any), scalars as written; the first of repeated keys wins.
func nodeValue(n *yaml.Node) any {
	budget := 1 << 20 // nodes, against alias bombs and cycles
	var conv func(n *yaml.Node, depth int) any
	conv = func(n *yaml.Node, depth int) any {
		n = deref(n)
		budget--
		if isNull(n) || depth > 100 || budget < 0 {
			return nil
		}
		switch n.Kind {
		case yaml.SequenceNode:
			out := make([]any, 0, len(n.Content))
			for _, it := range n.Content {
				out = append(out, conv(it, depth+1))
			}
			return out
		case yaml.MappingNode:
			out := map[string]any{}
			for i := 0; i+1 < len(n.Content); i += 2 {
				k := deref(n.Content[i])
				if k.Kind != yaml.ScalarNode {
					continue
				}
				if _, dup := out[k.Value]; !dup {
					out[k.Value] = conv(n.Content[i+1], depth+1)
				}
			}
			return out
		}
		return n.Value
	}
	return conv(n, 0)
}

func deref(n *yaml.Node) *yaml.Node {
	for i := 0; n != nil && n.Kind == yaml.AliasNode && n.Alias != nil && i < 100; i++ {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n == nil || n.Kind == 0 || (n.Kind == yaml.ScalarNode && n.Tag == "!!null")
}

func describe(n *yaml.Node) string {
	n = deref(n)
	switch {
	case isNull(n):
		return "nothing (null)"
	case n.Kind == yaml.MappingNode:
		return "a mapping"
	case n.Kind == yaml.SequenceNode:
		return "a list"
	case n.Kind == yaml.ScalarNode:
		switch n.Tag {
		case "!!int", "!!float":
			return "the number " + n.Value
		case "!!bool":
			return "the boolean " + n.Value
		}
		return fmt.Sprintf("the string %q", n.Value)
	}
	return "an unexpected YAML node"
}

// scalarText is the text of val, a value viper returned, or false when val
// is not a scalar. node, when val came from the file, is its YAML node: a
// value yaml.v3 typed (0123 -> 83, 1.50 -> 1.5, 1_000 -> 1000) is taken as
// written there, as the strict decoding always did.
func scalarText(val any, node *yaml.Node) (string, bool) {
	if val == nil {
		return "", false
	}
	if s, ok := val.(string); ok {
		return s, true
	}
	if k := reflect.ValueOf(val).Kind(); k == reflect.Slice || k == reflect.Array || k == reflect.Map {
		return "", false
	}
	if node = deref(node); node != nil && node.Kind == yaml.ScalarNode {
		return node.Value, true
	}
	return fmt.Sprint(val), true
}

// describeValue says what val, a value viper returned, is, for errors; node
// is its YAML node when it came from the file.
func describeValue(val any, node *yaml.Node) string {
	text, ok := scalarText(val, node)
	if !ok {
		switch reflect.ValueOf(val).Kind() {
		case reflect.Invalid:
			return "nothing (null)"
		case reflect.Map:
			return "a mapping"
		}
		return "a list"
	}
	switch val.(type) {
	case string:
		return fmt.Sprintf("the string %q", text)
	case bool:
		return "the boolean " + text
	case int, int8, int16, int32, int64, uint, uint8, uint16, uint32, uint64, float32, float64:
		return "the number " + text
	}
	return fmt.Sprintf("the value %q", text)
}

// decodeValue parses val, the value viper returned for key s (not nil), and
// stores it in c. node is the key's YAML node when val came from the file;
// itemSrc, if not nil, is told where each list item or column came from.
func decodeValue(c *Config, s keySpec, val any, node *yaml.Node, itemSrc func(string, *yaml.Node)) *Problem {
	bad := func(format string, a ...any) *Problem {
		return &Problem{Key: s.key, Msg: fmt.Sprintf(format, a...)}
	}
	switch s.kind {
	case kindList:
		if text, ok := val.(string); ok && node == nil {
			val = textList(text) // environment variable or single-valued flag
		}
		var items []any
		switch x := val.(type) {
		case []any: // the file, or text
			items = x
		case []string: // a list-valued flag: one statement per item
			for _, it := range x {
				items = append(items, it)
			}
		default:
			return bad("must be %s (a YAML list, one statement per item), got %s", wantList, describeValue(val, node))
		}
		list := make([]string, 0, len(items))
		for i, it := range items {
			var in *yaml.Node // the item's node, for its line and text
			if node != nil && node.Kind == yaml.SequenceNode && i < len(node.Content) {
				in = deref(node.Content[i])
			}
			ik := fmt.Sprintf("%s[%d]", s.key, i)
			if itemSrc != nil {
				itemSrc(ik, in)
			}
			if it == nil {
				list = append(list, "")
				continue
			}
			text, ok := scalarText(it, in)
			if !ok {
				return &Problem{Key: ik, Msg: fmt.Sprintf("must be a SQL statement (a string), got %s; quote statements that contain \": \"", describeValue(it, in))}
			}
			list = append(list, text)
		}
		*listField(c, s.key) = list
		return nil
	case kindColumns:
		// Columns are read from YAML nodes, never from viper's map: viper
		// lowercases map keys, and column names keep the case written (so
		// that "First_Name" is reported, not silently renamed).
		n := node // the file
		if n == nil {
			var msg string
			switch x := val.(type) {
			case string: // environment variable or single-valued flag
				n, msg = textColumns(x)
			case []string: // a list-valued flag: NAME=EXPRESSION per item
				n, msg = itemColumns(x)
			default:
				msg = fmt.Sprintf("must be %s, got %s", wantColumns, describeValue(val, nil))
			}
			if msg != "" {
				return bad("%s", msg)
			}
		}
		return decodeColumns(c, n, itemSrc)
	}

	text, ok := scalarText(val, node)
	if !ok {
		return bad("must be %s, got %s", scalarWant(s), describeValue(val, node))
	}
	return decodeScalar(c, s, text)
}

// decodeColumns parses the columns mapping n into c.
func decodeColumns(c *Config, n *yaml.Node, itemSrc func(string, *yaml.Node)) *Problem {
	n = deref(n)
	if n.Kind != yaml.MappingNode {
		return &Problem{Key: "columns", Msg: fmt.Sprintf("must be %s, got %s", wantColumns, describe(n))}
	}
	var cols []Column
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		kn, vn := deref(n.Content[i]), deref(n.Content[i+1])
		if kn.Kind != yaml.ScalarNode || isNull(kn) {
			return &Problem{Key: "columns", Msg: fmt.Sprintf("column names must be plain names, got %s", describe(kn))}
		}
		ck := "columns." + kn.Value
		if itemSrc != nil {
			itemSrc(ck, kn)
		}
		if seen[kn.Value] {
			return &Problem{Key: ck, Msg: "is set twice"}
		}
		seen[kn.Value] = true
		var expr string
		switch {
		case isNull(vn):
		case vn.Kind == yaml.ScalarNode:
			expr = vn.Value
		default:
			return &Problem{Key: ck, Msg: fmt.Sprintf("must be a SQL expression (a string), got %s", describe(vn))}
		}
		cols = append(cols, Column{Name: kn.Value, Expr: expr})
	}
	c.Columns = cols
	return nil
}

// decodeScalar parses text as the value of scalar key s and stores it in c.
func decodeScalar(c *Config, s keySpec, text string) *Problem {
	bad := func(format string, a ...any) *Problem {
		return &Problem{Key: s.key, Msg: fmt.Sprintf(format, a...)}
	}
	t := strings.TrimSpace(text)
	switch s.kind {
	case kindString:
		*stringField(c, s.key) = t
	case kindEnum:
		*stringField(c, s.key) = strings.ToLower(t)
	case kindInt:
		v, err := strconv.ParseInt(t, 10, 0)
		if err != nil {
			return bad("must be %s, got %q", s.want, text)
		}
		*intField(c, s.key) = int(v)
	case kindFloat:
		v, err := strconv.ParseFloat(t, 64)
		if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
			return bad("must be %s, got %q", s.want, text)
		}
		c.Backfill.MaxRowsPerSecond = v
	case kindDuration:
		d, err := time.ParseDuration(t) // needs a unit, except "0"
		if err != nil {
			return bad("must be %s, got %q", wantDuration, text)
		}
		*durationField(c, s.key) = d
	case kindSize:
		v, msg := ParseSize(t)
		if msg != nil {
			return bad("%s", msg.Error())
		}
		c.Throttle.MaxSlotLag = v
	default:
		panic("config: " + s.key + " is not a scalar key")
	}
	return nil
}

func scalarWant(s keySpec) string {
	switch s.kind {
	case kindInt, kindFloat:
		return s.want
	case kindDuration:
		return wantDuration
	case kindSize:
		return wantSize
	}
	return "a string"
}

var sizeRE = regexp.MustCompile(`^([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)$`)

var sizeUnits = map[string]int64{
	"": 1, "b": 1,
	"k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
	"m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
	"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
	"t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}

// ParseSize parses a byte size: a plain integer of bytes, or a number with a
// unit B, kB, MB, GB, TB or KiB, MiB, GiB, TiB (any case; kB/MB/GB/TB are
// 1024-based like PostgreSQL's). "0" is zero. The error reads
// `must be a size such as 1GB or 512MB, got "lots"`.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	m := sizeRE.FindStringSubmatch(t)
	if m == nil {
		if strings.HasPrefix(t, "-") && sizeRE.MatchString(strings.TrimPrefix(t, "-")) {
			return 0, fmt.Errorf("must not be negative (0 means no cap), got %q", s)
		}
		return 0, fmt.Errorf("must be %s, got %q", wantSize, s)
	}
	mult, ok := sizeUnits[strings.ToLower(m[2])]
	if !ok {
		return 0, fmt.Errorf("must be %s (units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), got %q", wantSize, s)
	}
	tooBig := fmt.Errorf("is too large, got %q", s)
	if !strings.Contains(m[1], ".") {
		n, err := strconv.ParseInt(m[1], 10, 64)
		if err != nil || n > math.MaxInt64/mult {
			return 0, tooBig
		}
		return n * mult, nil
	}
	if mult == 1 {
		return 0, fmt.Errorf("must be a whole number of bytes or use a unit such as MB, got %q", s)
	}
	f, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return 0, fmt.Errorf("must be %s, got %q", wantSize, s)
	}
	b := f * float64(mult)
	if b >= math.MaxInt64 {
		return 0, tooBig
	}
	return int64(b), nil
}

func stringField(c *Config, key string) *string {
	switch key {
	case "name":
		return &c.Name
	case "database.dsn":
		return &c.Database.DSN
	case "table":
		return &c.Table
	case "dual_write.detect":
		return &c.DualWrite.Detect
	case "contract_policy.mode":
		return &c.ContractPolicy.Mode
	case "http.listen":
		return &c.HTTP.Listen
	case "log.level":
		return &c.Log.Level
	case "log.format":
		return &c.Log.Format
	}
	panic("config: no string field for " + key)
}

func intField(c *Config, key string) *int {
	switch key {
	case "backfill.batch_size":
		return &c.Backfill.BatchSize
	case "backfill.workers":
		return &c.Backfill.Workers
	case "sync.max_batch_keys":
		return &c.Sync.MaxBatchKeys
	case "ddl.max_retries":
		return &c.DDL.MaxRetries
	case "dual_write.min_evidence":
		return &c.DualWrite.MinEvidence
	}
	panic("config: no int field for " + key)
}

func durationField(c *Config, key string) *time.Duration {
	switch key {
	case "backfill.target_batch_time":
		return &c.Backfill.TargetBatchTime
	case "backfill.sleep":
		return &c.Backfill.Sleep
	case "throttle.max_replica_lag":
		return &c.Throttle.MaxReplicaLag
	case "sync.flush_interval":
		return &c.Sync.FlushInterval
	case "dual_write.quiet_period":
		return &c.DualWrite.QuietPeriod
	case "contract_policy.hold":
		return &c.ContractPolicy.Hold
	case "contract_policy.lock_timeout":
		return &c.ContractPolicy.LockTimeout
	case "contract_policy.catchup_timeout":
		return &c.ContractPolicy.CatchupTimeout
	case "ddl.lock_timeout":
		return &c.DDL.LockTimeout
	}
	panic("config: no duration field for " + key)
}

func listField(c *Config, key string) *[]string {
	switch key {
	case "expand":
		return &c.Expand
	case "contract":
		return &c.Contract
	case "rollback":
		return &c.Rollback
	}
	panic("config: no list field for " + key)
}
