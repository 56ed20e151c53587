package exprcheck

import "slices"

// dependence is what a stable call's value depends on, and its immutable
// form where one exists: the catalog says a call is stable, not why.
type dependence struct {
	settings []string
	note     string
	fix      string
}

// describe adds what d says to f, once each.
func (f *Finding) describe(d dependence) {
	for _, s := range d.settings {
		if !slices.Contains(f.Settings, s) {
			f.Settings = append(f.Settings, s)
		}
	}
	if f.Note == "" {
		f.Note = d.note
	}
	if f.Fix == "" {
		f.Fix = d.fix
	}
}

// Settings is every setting a stable expression may depend on: plan prints
// the values the daemon evaluates with.
var Settings = []string{"TimeZone", "DateStyle", "IntervalStyle", "lc_monetary", "lc_numeric", "lc_time", "search_path", "extra_float_digits"}

var transactionTime = dependence{
	note: "the time of the transaction that evaluates it: the daemon's is never the application's",
	fix:  "write the time from the application; an expression of the row cannot reproduce it",
}

var inZone = dependence{
	settings: []string{"TimeZone"},
	fix:      "convert in a fixed zone first: (x AT TIME ZONE 'UTC') is a timestamp, e.g. (created_at AT TIME ZONE 'UTC')::date or date_trunc('day', created_at AT TIME ZONE 'UTC')",
}

// types: what a type's text form (its output and input functions) depends on.
var types = map[string]dependence{
	"timestamptz": {settings: []string{"TimeZone", "DateStyle"},
		fix: "convert in a fixed zone first: (created_at AT TIME ZONE 'UTC')::date, or to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') (to_char stays stable, as it reads lc_time for TM patterns; without TM it gives the same text everywhere)"},
	"timestamp": {settings: []string{"DateStyle"},
		fix: "to_char(x, 'YYYY-MM-DD HH24:MI:SS') gives one text whatever DateStyle (it stays stable: TM patterns read lc_time)"},
	"date": {settings: []string{"DateStyle"},
		fix: "to_char(x, 'YYYY-MM-DD') gives one text whatever DateStyle (it stays stable: TM patterns read lc_time)"},
	"timetz":   {settings: []string{"TimeZone"}},
	"interval": {settings: []string{"IntervalStyle"}, fix: "extract(epoch FROM x) is immutable"},
	"money":    {settings: []string{"lc_monetary"}, fix: "x::numeric is immutable"},
	"regclass": {settings: []string{"search_path"}, fix: "keep the oid, or the name from the row"},
	"regproc":  {settings: []string{"search_path"}}, "regprocedure": {settings: []string{"search_path"}},
	"regoper": {settings: []string{"search_path"}}, "regoperator": {settings: []string{"search_path"}},
	"regtype": {settings: []string{"search_path"}}, "regconfig": {settings: []string{"search_path"}},
	"regdictionary": {settings: []string{"search_path"}}, "regnamespace": {settings: []string{"search_path"}},
	"regcollation": {settings: []string{"search_path"}},
}

// funcs: what a stable built-in function depends on, by name (cast
// functions too: timestamptz to date is function date).
var funcs = map[string]dependence{
	"now": transactionTime, "transaction_timestamp": transactionTime, "statement_timestamp": transactionTime,
	"current_timestamp": transactionTime, "current_date": transactionTime, "current_time": transactionTime,
	"localtimestamp": transactionTime, "localtime": transactionTime, "clock_timestamp": transactionTime,
	"timeofday": transactionTime, "age": transactionTime,
	"to_char": {settings: []string{"TimeZone", "lc_time", "lc_numeric", "lc_monetary"},
		note: "TimeZone for a timestamptz, lc_time for TM patterns, lc_numeric and lc_monetary for D, G, L",
		fix:  "to_char is stable on every type; for a timestamptz convert first (to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')) and use no TM, D, G or L pattern: the text is then the same everywhere"},
	"to_timestamp": inZone, "date_trunc": inZone, "date_part": inZone, "extract": inZone,
	"date": inZone, "timestamp": inZone, "timestamptz": inZone, "time": inZone, "timetz": inZone,
	"current_setting": {note: "the setting it reads, in the daemon's session"},
	"current_user":    {note: "the session's role: the daemon's is not the application's"},
	"session_user":    {note: "the session's role: the daemon's is not the application's"},
	"current_role":    {note: "the session's role: the daemon's is not the application's"},
	"user":            {note: "the session's role: the daemon's is not the application's"},
	"current_schema":  {settings: []string{"search_path"}}, "current_schemas": {settings: []string{"search_path"}},
	"format": {note: "the output of its arguments' types"}, "concat": {note: "the output of its arguments' types"},
	"concat_ws": {note: "the output of its arguments' types"},
}
