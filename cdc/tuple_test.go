package cdc

import (
	"encoding/binary"
	"testing"

	"github.com/jackc/pglogrepl"
)

// encodeTuple writes a TupleData as pgoutput does.
func encodeTuple(cols ...column) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(cols)))
	for _, c := range cols {
		b = append(b, c.kind)
		if c.kind == 't' || c.kind == 'b' {
			b = binary.BigEndian.AppendUint32(b, uint32(len(c.data)))
			b = append(b, c.data...)
		}
	}
	return b
}

// TestReadChangeAgreesWithPglogrepl: the in-place reader sees what
// pglogrepl's full parser sees, for inserts and for updates with no old
// tuple, an old key, and a whole old row; and refuses a truncated message.
func TestReadChangeAgreesWithPglogrepl(t *testing.T) {
	txt := func(s string) column { return column{kind: 't', data: []byte(s)} }
	null, toast := column{kind: 'n'}, column{kind: 'u'}
	newT := encodeTuple(txt("7"), txt("Mary Ann Smith"), null, toast)
	rel := binary.BigEndian.AppendUint32(nil, 16384)
	msgs := map[string][]byte{
		"insert":              append(append(append([]byte{'I'}, rel...), 'N'), newT...),
		"update":              append(append(append([]byte{'U'}, rel...), 'N'), newT...),
		"update with key":     append(append(append(append(append([]byte{'U'}, rel...), 'K'), encodeTuple(txt("6"), null, null, null)...), 'N'), newT...),
		"update with old row": append(append(append(append(append([]byte{'U'}, rel...), 'O'), encodeTuple(txt("7"), txt("Mary Smith"), txt("x"), txt("y"))...), 'N'), newT...),
	}
	for name, msg := range msgs {
		var c change
		if err := readChange(msg, &c); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		parsed, err := pglogrepl.Parse(msg)
		if err != nil {
			t.Fatalf("%s: pglogrepl: %v", name, err)
		}
		var want, wantOld *pglogrepl.TupleData
		switch m := parsed.(type) {
		case *pglogrepl.InsertMessage:
			want = m.Tuple
		case *pglogrepl.UpdateMessage:
			want, wantOld = m.NewTuple, m.OldTuple
			if c.wholeOld != (m.OldTupleType == pglogrepl.UpdateMessageTupleTypeOld) {
				t.Errorf("%s: wholeOld %v", name, c.wholeOld)
			}
		}
		same := func(got tuple, want *pglogrepl.TupleData) bool {
			if want == nil {
				return len(got) == 0
			}
			if len(got) != len(want.Columns) {
				return false
			}
			for i, col := range want.Columns {
				if got[i].kind != col.DataType || string(got[i].data) != string(col.Data) {
					return false
				}
			}
			return true
		}
		if c.relation != 16384 || !same(c.new, want) || !same(c.old, wantOld) {
			t.Errorf("%s: read %+v, pglogrepl %+v / %+v", name, c, want, wantOld)
		}
		if err := readChange(msg[:len(msg)-3], &c); err == nil {
			t.Errorf("%s: a truncated message read without error", name)
		}
	}
}
