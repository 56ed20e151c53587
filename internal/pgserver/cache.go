package pgserver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// cache is the directory where fetched binaries are kept, one directory per
// package version, so the next run starts without the network.
type cache struct {
	dir string
}

// openCache returns the cache: dir if not "", else
// os.UserCacheDir()/cdcbackfill/postgres, but /var/cache/cdcbackfill/postgres
// for root, whose server runs as another user (see serverUser) that could
// not read root's home directory.
func openCache(dir string) (*cache, error) {
	if dir == "" {
		base := "/var/cache"
		if os.Geteuid() != 0 {
			d, err := os.UserCacheDir()
			if err != nil {
				return nil, fmt.Errorf("find the cache directory for PostgreSQL binaries: %w", err)
			}
			base = d
		}
		dir = filepath.Join(base, "cdcbackfill", "postgres")
	}
	c := &cache{dir: dir}
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return nil, fmt.Errorf("create the cache directory for PostgreSQL binaries: %w", err)
	}
	return c, nil
}

// lock takes an exclusive lock on the version's entry, so that test
// binaries started together (go test ./...) install or download it once:
// the others wait, then find it. unlock releases it.
func (c *cache) lock(ctx context.Context, major int, o Options) (unlock func(), err error) {
	path := filepath.Join(c.dir, strconv.Itoa(major)+".lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock file %s: %w", path, err)
	}
	said := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = f.Close() }, nil // closing releases the lock
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if !said {
			o.logf("waiting for another process installing PostgreSQL %d (lock %s)", major, path)
			said = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for lock %s: %w", path, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
