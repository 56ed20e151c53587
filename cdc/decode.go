package cdc

import (
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
)

// relation is what the stream keeps of a pgoutput Relation message: the name
// and where the replica identity key sits in a tuple.
type relation struct {
	name    string   // "schema.table"
	keyCols []string // shared by every Change of this relation version; read-only
	keyIdx  []int    // positions of keyCols in a tuple
	srcIdx  []int    // positions of the source columns; nil when one is missing
	newIdx  []int    // positions of the new columns found
}

// newRelation finds the key in a relation's columns: the columns named by
// keyNames where given (the table's primary key), else those flagged as the
// replica identity. Under REPLICA IDENTITY FULL every column is flagged, and
// a null or unchanged-TOAST value in one of them must not stop the stream:
// only the primary key is read.
func newRelation(m *pglogrepl.RelationMessage, keyNames, srcNames, newNames []string) *relation {
	r := &relation{name: m.Namespace + "." + m.RelationName}
	r.srcIdx, r.newIdx = positions(m, srcNames, true), positions(m, newNames, false)
	if len(keyNames) == 0 {
		for i, c := range m.Columns {
			if c.Flags&1 != 0 {
				r.keyCols = append(r.keyCols, c.Name)
				r.keyIdx = append(r.keyIdx, i)
			}
		}
		return r
	}
	for _, k := range keyNames {
		for i, c := range m.Columns {
			if c.Name == k {
				r.keyCols = append(r.keyCols, c.Name)
				r.keyIdx = append(r.keyIdx, i)
				break
			}
		}
	}
	if len(r.keyCols) != len(keyNames) {
		r.keyCols, r.keyIdx = nil, nil // change() reports it
	}
	return r
}

// positions finds names among the relation's columns; with all, nil unless
// every one is there.
func positions(m *pglogrepl.RelationMessage, names []string, all bool) []int {
	var idx []int
	for _, n := range names {
		found := false
		for i, c := range m.Columns {
			if c.Name == n {
				idx, found = append(idx, i), true
				break
			}
		}
		if !found && all {
			return nil
		}
	}
	return idx
}

// txnDecoder turns pgoutput v1 messages of one connection into Events. It
// holds no rows: only the pending Begin of the transaction in flight, which
// waits for the Origin message that may follow it.
type txnDecoder struct {
	originPrefix string
	keyNames     []string // the primary key; nil: the replica identity's columns
	srcNames     []string // the columns the expressions read
	newNames     []string // the columns they compute
	relations    map[uint32]*relation

	inTxn     bool
	skip      bool  // the transaction in flight carries the daemon's origin
	begin     Event // not yet emitted until a Change or the Commit
	beginSent bool
	deletes   int

	commitEnd  pglogrepl.LSN // of the last transaction received, skipped or not
	commitTime time.Time

	chg change // reused by every Insert and Update

}

func newTxnDecoder(originPrefix string, keyNames, srcNames, newNames []string) *txnDecoder {
	return &txnDecoder{originPrefix: originPrefix, keyNames: keyNames, srcNames: srcNames, newNames: newNames,
		relations: map[uint32]*relation{}}
}

// decoded reports what a message meant for the counters.
type decoded int

const (
	decodedOther decoded = iota
	decodedCommit
	decodedSkippedCommit
)

// decode handles one pgoutput message. Errors it returns are permanent: the
// same WAL would decode the same way after a reconnect.
func (d *txnDecoder) decode(walData []byte, emit func(Event) error) (decoded, error) {
	if len(walData) == 0 {
		return decodedOther, permanent(fmt.Errorf("decode pgoutput: empty message"))
	}
	if d.skip {
		switch walData[0] {
		case 'I', 'U', 'D', 'T':
			// A change of the daemon's own transaction: not even parsed
			// (the backfill's writes are most of what the stream carries).
			return decodedOther, nil
		}
	}
	bad := func(err error) (decoded, error) {
		return decodedOther, permanent(fmt.Errorf("decode pgoutput message %q: %w", walData[0], err))
	}
	switch walData[0] {
	case 'B':
		lsn, at, xid, err := readBegin(walData)
		if err != nil {
			return bad(err)
		}
		d.inTxn, d.skip, d.beginSent, d.deletes = true, false, false, 0
		d.begin = Event{Kind: Begin, FinalLSN: lsn, CommitTime: at, Xid: xid}
		return decodedOther, nil
	case 'I', 'U':
		if err := readChange(walData, &d.chg); err != nil {
			return bad(err)
		}
		return decodedOther, d.change(&d.chg, emit)
	case 'C':
		commit, end, at, err := readCommit(walData)
		if err != nil {
			return bad(err)
		}
		return d.commit(commit, end, at, emit)
	}
	msg, err := pglogrepl.Parse(walData)
	if err != nil {
		return bad(err)
	}
	switch m := msg.(type) {
	case *pglogrepl.RelationMessage:
		// Always, skipped transaction or not: the server sends a relation
		// once per connection (and again after ALTER TABLE), never again.
		d.relations[m.RelationID] = newRelation(m, d.keyNames, d.srcNames, d.newNames)

	case *pglogrepl.OriginMessage:
		if d.inTxn && d.originPrefix != "" && strings.HasPrefix(m.Name, d.originPrefix) {
			d.skip = true
		}

	case *pglogrepl.DeleteMessage, *pglogrepl.TruncateMessage:
		if !d.skip {
			d.deletes++
		}

	default:
		// Type and logical decoding messages say nothing about keys.
	}
	return decodedOther, nil
}

// commit ends the transaction in flight.
func (d *txnDecoder) commit(commitLSN, end pglogrepl.LSN, at time.Time, emit func(Event) error) (decoded, error) {
	if !d.inTxn {
		return decodedOther, permanent(fmt.Errorf("decode pgoutput: commit %s without begin", commitLSN))
	}
	d.inTxn = false
	d.commitEnd, d.commitTime = end, at
	if d.skip {
		return decodedSkippedCommit, nil
	}
	if err := d.sendBegin(emit); err != nil {
		return decodedOther, err
	}
	return decodedCommit, emit(Event{
		Kind:       Commit,
		CommitLSN:  commitLSN,
		EndLSN:     end,
		CommitTime: at,
		Deletes:    d.deletes,
		Xid:        d.begin.Xid,
	})
}

func (d *txnDecoder) sendBegin(emit func(Event) error) error {
	if d.beginSent {
		return nil
	}
	d.beginSent = true
	return emit(d.begin)
}

// change emits the key of the row version in c.new. For an UPDATE that
// changed the key that is the new key only: the old row no longer exists.
func (d *txnDecoder) change(c *change, emit func(Event) error) error {
	if d.skip {
		return nil
	}
	if !d.inTxn {
		return permanent(fmt.Errorf("decode pgoutput: change outside a transaction"))
	}
	rel, ok := d.relations[c.relation]
	if !ok {
		return permanent(fmt.Errorf("decode pgoutput: change for relation %d before its Relation message", c.relation))
	}
	if len(rel.keyIdx) == 0 {
		if len(d.keyNames) > 0 {
			return permanent(fmt.Errorf("changes of %s do not carry its primary key %v: the publication's column list must include it", rel.name, d.keyNames))
		}
		return permanent(fmt.Errorf("relation %s has no replica identity key: give it a primary key", rel.name))
	}
	key := make([]string, len(rel.keyIdx))
	for i, idx := range rel.keyIdx {
		v, err := keyValue(rel, i, idx, c.new, c.old)
		if err != nil {
			return err
		}
		key[i] = v
	}
	if err := d.sendBegin(emit); err != nil {
		return err
	}
	var oldSource uint64
	if c.wholeOld {
		oldSource = sourceHash(rel.srcIdx, c.old)
	}
	return emit(Event{
		Kind:       Change,
		FinalLSN:   d.begin.FinalLSN,
		Relation:   rel.name,
		KeyColumns: rel.keyCols,
		Key:        key,
		Xid:        d.begin.Xid,
		Image: Image{
			Op:        c.op,
			Source:    sourceHash(rel.srcIdx, c.new),
			OldSource: oldSource,
			Written:   written(rel.newIdx, c.new),
		},
	})
}

// sourceHash is FNV-1a over the values at idx, 0 when one is unknown (an
// unchanged TOAST value comes without its data) or there are none.
func sourceHash(idx []int, t tuple) uint64 {
	if len(idx) == 0 || len(t) == 0 {
		return 0
	}
	const offset, prime = 14695981039346656037, 1099511628211
	h := uint64(offset)
	for _, i := range idx {
		if i >= len(t) {
			return 0
		}
		c := t[i]
		switch c.kind {
		case pglogrepl.TupleDataTypeText, pglogrepl.TupleDataTypeBinary:
			for _, b := range c.data {
				h = (h ^ uint64(b)) * prime
			}
			h = (h ^ 1) * prime // ends a value: ("ab","c") is not ("a","bc")
		case pglogrepl.TupleDataTypeNull:
			h = (h ^ 2) * prime
		default:
			return 0
		}
	}
	return max(h, 1)
}

// written reports whether a column at idx holds a value (not null).
func written(idx []int, t tuple) bool {
	for _, i := range idx {
		if i < len(t) && t[i].kind != pglogrepl.TupleDataTypeNull {
			return true
		}
	}
	return false
}

func keyValue(rel *relation, i, idx int, newTuple, oldTuple tuple) (string, error) {
	col := rel.keyCols[i]
	if idx >= len(newTuple) {
		return "", permanent(fmt.Errorf("decode pgoutput: %s tuple has %d columns, key column %q is number %d",
			rel.name, len(newTuple), col, idx+1))
	}
	c := newTuple[idx]
	if c.kind == pglogrepl.TupleDataTypeToast && idx < len(oldTuple) {
		// An unchanged TOASTed key is not in the new tuple; the old one has it.
		c = oldTuple[idx]
	}
	switch c.kind {
	case pglogrepl.TupleDataTypeText:
		return string(c.data), nil
	case pglogrepl.TupleDataTypeNull:
		return "", permanent(fmt.Errorf("key column %q of %s is null: the replica identity must be a NOT NULL key", col, rel.name))
	case pglogrepl.TupleDataTypeToast:
		return "", permanent(fmt.Errorf("key column %q of %s came as unchanged TOAST with no old value", col, rel.name))
	default:
		return "", permanent(fmt.Errorf("key column %q of %s has tuple data type %q, want text", col, rel.name, c.kind))
	}
}
