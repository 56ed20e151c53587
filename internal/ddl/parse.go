package ddl

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"github.com/pganalyze/pg_query_go/v6/parser"
)

// ParserVersion is the PostgreSQL whose grammar Parse knows.
const ParserVersion = "PostgreSQL 17"

// allowPrefix starts the comment that allows rules for one statement:
//
//	-- cdcbackfill:allow rewrite, scan
//	ALTER TABLE users ALTER COLUMN id TYPE bigint
const allowPrefix = "cdcbackfill:allow"

// Parse reads one entry of a statement list: exactly one statement.
func Parse(sql string) (*Statement, error) {
	tree, err := pg_query.Parse(sql)
	if err != nil {
		return nil, parseError(sql, err)
	}
	switch n := len(tree.Stmts); n {
	case 0:
		return nil, fmt.Errorf("%q holds no statement; remove the empty entry", sql)
	case 1:
	default:
		parts := make([]string, n)
		for i, raw := range tree.Stmts {
			parts[i] = fmt.Sprintf("%q", statementText(sql, raw))
		}
		return nil, fmt.Errorf("holds %d statements: %s; write one statement per list entry", n, strings.Join(parts, " and "))
	}
	allow, err := allowed(sql)
	if err != nil {
		return nil, err
	}
	s := &Statement{SQL: strings.TrimSpace(sql), InTransaction: true, Allow: allow, tree: tree}
	describe(s, tree.Stmts[0].Stmt)
	return s, nil
}

// parseError names the statement, the parser's message and where it stopped
// reading, and which grammar it knows: a newer server's syntax is a syntax
// error here, not a crash.
func parseError(sql string, err error) error {
	var pe *parser.Error
	if !errors.As(err, &pe) {
		return fmt.Errorf("%q: the parser failed: %w", sql, err)
	}
	at := ""
	if pe.Cursorpos > 0 && pe.Cursorpos <= len(sql) {
		at = fmt.Sprintf(" at character %d (%q)", pe.Cursorpos, near(sql, pe.Cursorpos-1))
	}
	return fmt.Errorf("%q does not parse: %s%s; it was read by %s's parser, which does not know syntax added later (such as 18's VIRTUAL generated columns)",
		sql, pe.Message, at, ParserVersion)
}

// near is the text from position i on, at most a few words.
func near(sql string, i int) string {
	rest := sql[i:]
	if len(rest) > 24 {
		rest = rest[:24] + "..."
	}
	return rest
}

// statementText is one statement of a parse, as written.
func statementText(sql string, raw *pg_query.RawStmt) string {
	from := int(raw.StmtLocation)
	to := len(sql)
	if raw.StmtLen > 0 {
		to = from + int(raw.StmtLen)
	}
	return strings.TrimSpace(sql[from:to])
}

// allowed reads the rules that the statement's own comments allow. The
// scanner finds the comments, so a "--" inside a string literal is not one.
func allowed(sql string) ([]Rule, error) {
	scan, err := pg_query.Scan(sql)
	if err != nil {
		return nil, parseError(sql, err)
	}
	var out []Rule
	for _, tok := range scan.Tokens {
		if tok.Token != pg_query.Token_SQL_COMMENT && tok.Token != pg_query.Token_C_COMMENT {
			continue
		}
		text := sql[tok.Start:tok.End]
		text = strings.TrimPrefix(text, "--")
		text = strings.TrimSuffix(strings.TrimPrefix(text, "/*"), "*/")
		text = strings.TrimSpace(text)
		rest, ok := strings.CutPrefix(text, allowPrefix)
		if !ok {
			continue
		}
		for _, f := range strings.FieldsFunc(rest, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' }) {
			rule := Rule(f)
			if !slices.Contains(Rules, rule) {
				return nil, fmt.Errorf("%q: the comment %q allows %q, which is no rule; the rules are %s", sql, text, f, RuleNames())
			}
			out = append(out, rule)
		}
	}
	return out, nil
}

// RuleNames lists the rules for messages.
func RuleNames() string {
	names := make([]string, len(Rules))
	for i, r := range Rules {
		names[i] = string(r)
	}
	return strings.Join(names, ", ")
}
