package ddl

import (
	"maps"
	"slices"
	"testing"
)

func TestColumnsOfStatements(t *testing.T) {
	added := AddedColumns([]string{
		`ALTER TABLE users ADD COLUMN first_name text, ADD last_name text`,
		`ALTER TABLE users ADD COLUMN IF NOT EXISTS "Nick Name" text, ADD CONSTRAINT c CHECK (true)`,
	})
	if got := slices.Sorted(maps.Keys(added)); !slices.Equal(got, []string{"Nick Name", "first_name", "last_name"}) {
		t.Errorf("AddedColumns = %v", got)
	}
	dropped := DroppedColumns([]string{
		`ALTER TABLE users DROP COLUMN full_name, DROP CONSTRAINT c`,
		`ALTER TABLE users DROP IF EXISTS "Old Name", ALTER COLUMN x DROP DEFAULT, ALTER COLUMN y DROP NOT NULL`,
	})
	if !slices.Equal(dropped, []string{"full_name", "Old Name"}) {
		t.Errorf("DroppedColumns = %v", dropped)
	}
}
