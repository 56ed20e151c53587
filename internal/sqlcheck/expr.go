// Package sqlcheck proves, before any use, that a user expression is a
// single SQL expression: it cannot close the parentheses it is put in, end
// the statement, or hide text in a comment. PostgreSQL then checks the rest
// when the statement that uses it is prepared.
package sqlcheck

import (
	"fmt"
	"strings"
)

// Expression returns an error naming the problem when expr could be
// anything other than one self-contained expression.
func Expression(expr string) error {
	if strings.TrimSpace(expr) == "" {
		return fmt.Errorf("expression is empty")
	}
	depth := 0
	for i := 0; i < len(expr); i++ {
		c := expr[i]
		switch {
		case c == '\'' || c == '"':
			end := closing(expr, i, c)
			if end < 0 {
				return fmt.Errorf("unterminated %s starting at offset %d", quoteName(c), i)
			}
			i = end
		case c == '$' && dollarTag(expr, i) != "":
			tag := dollarTag(expr, i)
			end := strings.Index(expr[i+len(tag):], tag)
			if end < 0 {
				return fmt.Errorf("unterminated dollar-quoted string starting at offset %d", i)
			}
			i += len(tag) + end + len(tag) - 1
		case c == '(':
			depth++
		case c == ')':
			depth--
			if depth < 0 {
				return fmt.Errorf("unbalanced ')' at offset %d", i)
			}
		case c == ';':
			return fmt.Errorf("';' at offset %d: an expression must not end the statement", i)
		case c == '-' && i+1 < len(expr) && expr[i+1] == '-',
			c == '/' && i+1 < len(expr) && expr[i+1] == '*':
			return fmt.Errorf("comment at offset %d: comments are not allowed in expressions", i)
		}
	}
	if depth != 0 {
		return fmt.Errorf("unbalanced '(': %d not closed", depth)
	}
	return nil
}

func quoteName(c byte) string {
	if c == '"' {
		return "quoted identifier"
	}
	return "string literal"
}

// closing finds the quote that ends the literal opened at i; a doubled quote
// is part of the literal.
func closing(s string, i int, q byte) int {
	for j := i + 1; j < len(s); j++ {
		if s[j] == q {
			if j+1 < len(s) && s[j+1] == q {
				j++
				continue
			}
			return j
		}
		if s[j] == '\\' && q == '\'' && i > 0 && (s[i-1] == 'E' || s[i-1] == 'e') {
			j++
		}
	}
	return -1
}

// dollarTag returns "$tag$" when a dollar quote starts at i ($1 is a
// parameter, not a quote).
func dollarTag(s string, i int) string {
	for j := i + 1; j < len(s); j++ {
		c := s[j]
		if c == '$' {
			return s[i : j+1]
		}
		if !(c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || (j > i+1 && c >= '0' && c <= '9')) {
			return ""
		}
	}
	return ""
}
