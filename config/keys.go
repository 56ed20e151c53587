package config

import (
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
)

// EnvPrefix starts every environment variable Load reads:
// EnvPrefix + the dotted key upper-cased with "." turned into "_".
const EnvPrefix = "CDCBACKFILL_"

const (
	wantSize    = "a size such as 1GB or 512MB"
	wantColumns = "a mapping of new column name to SQL expression"
)

var (
	durationType   = reflect.TypeOf(time.Duration(0))
	sizeType       = reflect.TypeOf(int64(0))
	statementsType = reflect.TypeOf([]string(nil))
	slotNamesType  = reflect.TypeOf(SlotNames(nil))
	columnsType    = reflect.TypeOf([]Column(nil))
)

// key is one config key: a leaf field of Config.
type key struct {
	name  string // dotted: "backfill.batch_size"
	index []int  // of the field in Config
	typ   reflect.Type
	tag   reflect.StructTag
}

// keys is every key, in the order of DESIGN.md.
var keys = leaves(reflect.TypeOf(Config{}), "", nil)

func leaves(t reflect.Type, prefix string, index []int) (out []key) {
	for i := range t.NumField() {
		f := t.Field(i)
		k := key{joinKey(prefix, f.Tag.Get("mapstructure")), append(index[:len(index):len(index)], i), f.Type, f.Tag}
		if f.Type.Kind() == reflect.Struct {
			out = append(out, leaves(f.Type, k.name, k.index)...)
		} else {
			out = append(out, k)
		}
	}
	return out
}

func joinKey(prefix, name string) string {
	if prefix == "" {
		return name
	}
	return prefix + "." + name
}

func findKey(name string) (key, bool) {
	i := slices.IndexFunc(keys, func(k key) bool { return k.name == name })
	if i < 0 {
		return key{}, false
	}
	return keys[i], true
}

// children lists the names in section prefix ("" is the top level), in
// order; none when prefix is not a section.
func children(prefix string) (out []string) {
	for _, k := range keys {
		rest, ok := k.name, prefix == ""
		if !ok {
			rest, ok = strings.CutPrefix(k.name, prefix+".")
		}
		if child, _, _ := strings.Cut(rest, "."); ok && !slices.Contains(out, child) {
			out = append(out, child)
		}
	}
	return out
}

// want says what a good scalar value of k looks like, for errors.
func (k key) want() string {
	check := k.tag.Get("check")
	lo, hi, ranged := strings.Cut(check, "..")
	switch {
	case k.typ == durationType:
		return "a duration such as 200ms or 2m"
	case k.typ == sizeType:
		return wantSize
	case k.typ.Kind() == reflect.String:
		return "a string"
	case k.typ.Kind() == reflect.Float64:
		return "a number" + map[string]string{">0": " > 0", ">=0": " >= 0"}[check]
	case ranged:
		return fmt.Sprintf("an integer from %s to %s", lo, hi)
	case check == ">0":
		return "a positive integer"
	}
	return "an integer" + map[string]string{">=0": " >= 0"}[check]
}

// problem says what is wrong with v, the value of k, by its check tag, or "".
func (k key) problem(v reflect.Value) string {
	check := k.tag.Get("check")
	if opts := strings.Split(check, "|"); len(opts) > 1 {
		if slices.Contains(opts, v.String()) {
			return ""
		}
		return fmt.Sprintf("must be one of %s, got %q", strings.Join(opts, ", "), v.String())
	}
	var x float64
	if v.CanInt() {
		x = float64(v.Int())
	} else if v.CanFloat() {
		x = v.Float()
	}
	lo, hi, ranged := strings.Cut(check, "..")
	if check == "" || check == ">0" && x > 0 || check == ">=0" && x >= 0 || ranged && x >= atof(lo) && x <= atof(hi) {
		return "" // a NaN is none of these
	}
	msg := "must be " + k.want()
	if k.typ == durationType || k.typ == sizeType {
		msg = map[string]string{">0": "must be greater than 0", ">=0": "must not be negative"}[check]
	}
	if zero := k.tag.Get("zero"); zero != "" {
		msg += " (0 means " + zero + ")"
	}
	return fmt.Sprintf("%s, got %v", msg, v.Interface())
}

func atof(s string) float64 {
	f, _ := strconv.ParseFloat(s, 64)
	return f
}

// Keys lists every known dotted key (for binding flags / docs), in the order
// of DESIGN.md. "columns" is one key: its value is a whole map.
func Keys() []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = k.name
	}
	return out
}

// ListKey says whether key takes a list: a list-valued flag gives one SQL
// statement (or slot name) per item, or one NAME=EXPRESSION for columns.
func ListKey(name string) bool {
	k, _ := findKey(name)
	return k.typ != nil && k.typ.Kind() == reflect.Slice
}

// EnvVar is the environment variable that overrides key, e.g.
// "backfill.batch_size" -> "CDCBACKFILL_BACKFILL_BATCH_SIZE".
func EnvVar(key string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// DefaultValue is the default of key as a string ("" when it has none), for
// flag help and docs.
func DefaultValue(name string) string {
	k, _ := findKey(name)
	return k.tag.Get("default")
}

// Default returns a Config with every default of DESIGN.md filled in and
// nothing else (no name, DSN, table or columns).
func Default() *Config {
	c, ps := decode(newViper())
	if len(ps) > 0 {
		panic("config: bad default: " + ps[0].String())
	}
	return c
}
