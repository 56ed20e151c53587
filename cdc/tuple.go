package cdc

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
)

// The messages every application write brings (Begin, Insert or Update,
// Commit) are read here in place: pglogrepl.Parse builds a struct and a
// copy of every column of every row, which the daemon, reading only the key
// and a hash of the source columns, paid for on each write. The rarer
// messages (Relation, Origin, Delete, Truncate...) still go through
// pglogrepl.

// column is one column of a tuple as pgoutput sends it, read in place.
type column struct {
	kind byte   // pglogrepl.TupleDataType*: 'n' null, 'u' unchanged TOAST, 't' text, 'b' binary
	data []byte // a slice of the message: valid until the next one
}

// tuple is a TupleData read in place.
type tuple []column

// readTuple reads the TupleData at the start of b into cols (reused) and
// returns it and what follows.
func readTuple(b []byte, cols tuple) (tuple, []byte, error) {
	if len(b) < 2 {
		return nil, nil, errShort
	}
	n := int(binary.BigEndian.Uint16(b))
	b = b[2:]
	cols = cols[:0]
	for range n {
		if len(b) < 1 {
			return nil, nil, errShort
		}
		c := column{kind: b[0]}
		b = b[1:]
		switch c.kind {
		case pglogrepl.TupleDataTypeText, pglogrepl.TupleDataTypeBinary:
			if len(b) < 4 {
				return nil, nil, errShort
			}
			l := int(binary.BigEndian.Uint32(b))
			if len(b) < 4+l {
				return nil, nil, errShort
			}
			c.data, b = b[4:4+l], b[4+l:]
		case pglogrepl.TupleDataTypeNull, pglogrepl.TupleDataTypeToast:
		default:
			return nil, nil, fmt.Errorf("tuple column of kind %q", c.kind)
		}
		cols = append(cols, c)
	}
	return cols, b, nil
}

var errShort = fmt.Errorf("message ends early")

// change is an Insert or Update message read in place.
type change struct {
	op       Op
	relation uint32
	new, old tuple
	wholeOld bool // old is the whole old row (REPLICA IDENTITY FULL), not only its key
}

// readChange reads an Insert ('I') or Update ('U') message, reusing the
// column slices of c.
func readChange(b []byte, c *change) error {
	if len(b) < 6 {
		return errShort
	}
	c.relation = binary.BigEndian.Uint32(b[1:])
	c.old, c.wholeOld = c.old[:0], false
	kind, rest := b[0], b[5:]
	var err error
	switch kind {
	case 'I':
		c.op = OpInsert
	case 'U':
		c.op = OpUpdate
		if rest[0] == 'K' || rest[0] == 'O' {
			c.wholeOld = rest[0] == 'O'
			if c.old, rest, err = readTuple(rest[1:], c.old); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("not a change: %q", kind)
	}
	if len(rest) < 1 || rest[0] != 'N' {
		return fmt.Errorf("%q message without a new tuple", kind)
	}
	c.new, _, err = readTuple(rest[1:], c.new)
	return err
}

// postgresEpoch is where PostgreSQL's timestamps count from.
var postgresEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

func pgTime(micros uint64) time.Time {
	return postgresEpoch.Add(time.Duration(int64(micros)) * time.Microsecond).Local()
}

// readBegin reads a Begin message: final LSN, commit time, xid.
func readBegin(b []byte) (pglogrepl.LSN, time.Time, uint32, error) {
	if len(b) < 21 {
		return 0, time.Time{}, 0, errShort
	}
	return pglogrepl.LSN(binary.BigEndian.Uint64(b[1:])), pgTime(binary.BigEndian.Uint64(b[9:])), binary.BigEndian.Uint32(b[17:]), nil
}

// readCommit reads a Commit message: commit LSN, end LSN, commit time.
func readCommit(b []byte) (commit, end pglogrepl.LSN, at time.Time, err error) {
	if len(b) < 26 {
		return 0, 0, time.Time{}, errShort
	}
	return pglogrepl.LSN(binary.BigEndian.Uint64(b[2:])), pglogrepl.LSN(binary.BigEndian.Uint64(b[10:])),
		pgTime(binary.BigEndian.Uint64(b[18:])), nil
}
