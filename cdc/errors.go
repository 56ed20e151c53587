package cdc

import (
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5/pgconn"
)

var (
	// ErrSlotLost means the server removed WAL the slot still needed (the slot
	// was invalidated, e.g. by max_slot_wal_keep_size). Changes are missing for
	// good: only a new slot and a fresh backfill recover.
	ErrSlotLost = errors.New("replication slot lost WAL it still needed (invalidated); " +
		"changes since its confirmed position are gone: abort this migration and start it again " +
		"with a new slot and a fresh backfill")

	// ErrSlotMissing means the replication slot does not exist.
	ErrSlotMissing = errors.New("replication slot does not exist")

	// ErrPublicationMissing means the publication named in Config does not exist.
	ErrPublicationMissing = errors.New("publication does not exist")

	// ErrNotAllowed means the server refused the role: bad credentials, no
	// pg_hba.conf entry, or no REPLICATION privilege.
	ErrNotAllowed = errors.New("replication connection not allowed")
)

// permanentError marks an error that no reconnect can fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

func permanent(err error) error { return &permanentError{err: err} }

// classify returns the error Run should return when err cannot be fixed by
// reconnecting, or nil when a reconnect may help (network errors, server
// restart, pg_terminate_backend, the slot still held by a dying walsender).
func (s *Stream) classify(err error) error {
	var perm *permanentError
	if errors.As(err, &perm) {
		return perm.err
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return nil
	}
	text := pgErr.Message + " " + pgErr.Detail
	switch {
	case strings.Contains(text, "invalidated"),
		pgErr.Code == pgerrcode.ObjectNotInPrerequisiteState && strings.Contains(text, "can no longer get changes"),
		pgErr.Code == pgerrcode.UndefinedFile && strings.Contains(text, "removed"):
		return fmt.Errorf("slot %q: %w: %w", s.cfg.Slot, ErrSlotLost, withDetail(pgErr))
	case pgErr.Code == pgerrcode.UndefinedObject && strings.HasPrefix(pgErr.Message, "publication "):
		return fmt.Errorf("publication %q: %w: %w", s.cfg.Publication, ErrPublicationMissing, pgErr)
	case pgErr.Code == pgerrcode.UndefinedObject:
		return fmt.Errorf("slot %q: %w (it is created with the migration's backfill): %w", s.cfg.Slot, ErrSlotMissing, pgErr)
	case pgErr.Code == pgerrcode.InvalidAuthorizationSpecification, pgErr.Code == pgerrcode.InvalidPassword, pgErr.Code == pgerrcode.InsufficientPrivilege:
		return fmt.Errorf("%w (the role needs LOGIN, REPLICATION and a pg_hba.conf entry): %w", ErrNotAllowed, pgErr)
	case pgErr.Code == pgerrcode.InvalidCatalogName,
		pgErr.Code == pgerrcode.ObjectNotInPrerequisiteState,
		pgErr.Code == pgerrcode.InvalidParameterValue,
		pgErr.Code == pgerrcode.SyntaxError,
		pgErr.Code == pgerrcode.FeatureNotSupported:
		return fmt.Errorf("stream slot %q: %w", s.cfg.Slot, withDetail(pgErr))
	}
	return nil
}

// withDetail keeps the server's DETAIL line, which PgError.Error leaves out
// and which is where PostgreSQL says why a slot was invalidated.
func withDetail(pgErr *pgconn.PgError) error {
	if pgErr.Detail == "" {
		return pgErr
	}
	return fmt.Errorf("%w (%s)", pgErr, pgErr.Detail)
}
