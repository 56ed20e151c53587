package ddl

import (
	"testing"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }
