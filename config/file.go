package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/agnivade/levenshtein"
	"go.yaml.in/yaml/v3"
)

// readFile reads the YAML file at path, checks it is one YAML document and
// walks it; it returns the known keys' values as viper's nested maps, with
// the values as YAML nodes.
func (l *loader) readFile(path string) (map[string]any, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: cannot read config file %q: %w", path, err)
	}
	values := map[string]any{}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc, extra yaml.Node
	if err = dec.Decode(&doc); err == nil {
		if err = dec.Decode(&extra); err == nil {
			return nil, fmt.Errorf("config: %s holds more than one YAML document (line %d); write one migration per file", path, extra.Line)
		}
	}
	if err != nil && !errors.Is(err, io.EOF) { // EOF: an empty file, or the end of the one document
		return nil, fmt.Errorf("config: %s is not valid YAML: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return values, nil
		}
		root = root.Content[0]
	}
	switch root = deref(root); {
	case isNull(root):
	case root.Kind != yaml.MappingNode:
		l.problem("", fmt.Sprintf("%s: the top level must be a mapping of keys (name, database, table, ...), got %s", path, describe(root)), root.Line)
	default:
		l.walk("", root, values)
	}
	return values, nil
}

func (l *loader) problem(key, msg string, line int) {
	l.problems = append(l.problems, Problem{Key: key, Msg: msg, Source: l.at(line)})
}

// walk puts the known keys of mapping m (at dotted prefix) into values,
// records the lines of their values, and reports unknown and repeated keys.
// Config keys match case-insensitively, as viper does; a null value is as
// if the key were not there.
func (l *loader) walk(prefix string, m *yaml.Node, values map[string]any) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		kn, vn := deref(m.Content[i]), deref(m.Content[i+1])
		if kn.Kind != yaml.ScalarNode || isNull(kn) {
			l.problem(prefix, "keys must be plain names, got "+describe(kn), kn.Line)
			continue
		}
		name := strings.ToLower(kn.Value)
		full := joinKey(prefix, name)
		if first, ok := l.seen[full]; ok {
			l.problem(full, fmt.Sprintf("is set twice (first at line %d)", first), kn.Line)
			continue
		}
		l.seen[full] = kn.Line
		_, isKey := findKey(full)
		switch sub := children(full); {
		case (isKey || len(sub) > 0) && isNull(vn):
		case isKey:
			values[name] = vn
			l.lines[full] = kn.Line
			for j, it := range vn.Content {
				if it = deref(it); vn.Kind == yaml.SequenceNode {
					l.lines[fmt.Sprintf("%s[%d]", full, j)] = it.Line
				} else if j%2 == 0 { // a column name
					l.lines[full+"."+it.Value] = it.Line
				}
			}
		case vn.Kind != yaml.MappingNode && len(sub) > 0:
			l.problem(full, fmt.Sprintf("must be a mapping with the keys %s, got %s", strings.Join(sub, ", "), describe(vn)), kn.Line)
		case len(sub) > 0:
			section := map[string]any{}
			values[name] = section
			l.walk(full, vn, section)
		default:
			msg, where := fmt.Sprintf("unknown key %q", joinKey(prefix, kn.Value)), "at the top level"
			if prefix != "" {
				where = "under " + prefix
			}
			if s := suggest(full); s != "" {
				msg += fmt.Sprintf("; did you mean %q?", s)
			} else {
				msg += fmt.Sprintf("; known keys %s: %s", where, strings.Join(children(prefix), ", "))
			}
			l.problem("", msg, kn.Line)
		}
	}
}

// suggest returns the known key or section closest to an unknown key, or "".
func suggest(unknown string) string {
	norm := func(s string) string { return strings.NewReplacer("_", "", "-", "").Replace(strings.ToLower(s)) }
	cands := append(Keys(), children("")...) // every key and section
	sort.Strings(cands)
	best, bestD := "", 3
	for _, c := range cands {
		if norm(c) == norm(unknown) {
			return c
		}
		if d := levenshtein.ComputeDistance(unknown, c); d < bestD {
			best, bestD = c, d
		}
	}
	if best != "" {
		return best
	}
	// the right key at the wrong level: "batch_size" at the top
	last := unknown[strings.LastIndexByte(unknown, '.')+1:]
	for _, c := range Keys() {
		if strings.HasSuffix(c, "."+last) {
			return c
		}
	}
	return ""
}

func parseYAML(text string) *yaml.Node {
	var doc yaml.Node
	if err := yaml.Unmarshal([]byte(text), &doc); err != nil || doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		return nil
	}
	return deref(doc.Content[0])
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

// describe says what n is, for errors.
func describe(n *yaml.Node) string {
	n = deref(n)
	switch {
	case isNull(n):
		return "nothing (null)"
	case n.Kind == yaml.MappingNode:
		return "a mapping"
	case n.Kind == yaml.SequenceNode:
		return "a list"
	case n.Kind != yaml.ScalarNode:
		return "an unexpected YAML node"
	case n.Tag == "!!int" || n.Tag == "!!float":
		return "the number " + n.Value
	case n.Tag == "!!bool":
		return "the boolean " + n.Value
	}
	return fmt.Sprintf("the string %q", n.Value)
}
