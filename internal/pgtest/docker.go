package pgtest

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"

	"github.com/cdcbackfill/cdcbackfill/internal/pgserver"
)

// dockerImage is the image of the version asked for, postgres:16 when none
// is (the image the tests ran on before versions could be picked).
func dockerImage(version int) string {
	if version == 0 {
		version = 16
	}
	return fmt.Sprintf("postgres:%d-alpine", version)
}

// hbaReplication lets physical replication connections in from the host
// too; the image only allows them from inside the container.
const hbaReplication = `echo "host replication all all trust" >> "$PGDATA/pg_hba.conf"` + "\n"

// dockerAvailable reports whether a Docker engine answers within a few
// seconds.
func dockerAvailable(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	cli, err := testcontainers.NewDockerClientWithOpts(ctx)
	if err != nil {
		return err
	}
	return cli.Close()
}

// container is a server in a Docker container: the pgserver.Process of a
// Server attached to it.
type container struct {
	ctr *testcontainers.DockerContainer
}

// startDocker runs a container of image and returns it as a Server.
func startDocker(ctx context.Context, image string, logf func(string, ...any)) (*pgserver.Server, error) {
	ctr, err := testcontainers.Run(ctx, image,
		testcontainers.WithEnv(map[string]string{"POSTGRES_HOST_AUTH_METHOD": "trust"}),
		testcontainers.WithExposedPorts("5432/tcp"),
		testcontainers.WithCmd("postgres",
			"-c", "wal_level=logical",
			"-c", "max_replication_slots=20",
			"-c", "max_wal_senders=20",
			"-c", "fsync=off",
			"-c", "synchronous_commit=off",
			"-c", "full_page_writes=off",
			"-c", "max_connections=200"),
		testcontainers.WithFiles(testcontainers.ContainerFile{
			Reader:            strings.NewReader(hbaReplication),
			ContainerFilePath: "/docker-entrypoint-initdb.d/replication.sh",
			FileMode:          0o755,
		}),
		// The entrypoint runs a temporary server first, hence twice.
		testcontainers.WithWaitStrategy(wait.ForLog("database system is ready to accept connections").
			WithOccurrence(2).WithStartupTimeout(2*time.Minute)),
	)
	if err != nil {
		_ = testcontainers.TerminateContainer(ctr)
		return nil, fmt.Errorf("run %s: %w", image, err)
	}
	dsn, err := containerDSN(ctx, ctr)
	if err == nil {
		err = pgserver.WaitReady(ctx, dsn, nil)
	}
	var srv *pgserver.Server
	if err == nil {
		srv, err = pgserver.Attach(ctx, "docker", dsn, container{ctr}, logf)
	}
	if err != nil {
		_ = testcontainers.TerminateContainer(ctr)
		return nil, err
	}
	return srv, nil
}

// Restart stops the container (the server shuts down cleanly), starts
// it again and returns its new DSN.
func (c container) Restart(ctx context.Context) (string, error) {
	return c.stopAndStart(ctx, 30*time.Second)
}

// Crash kills the container (SIGKILL, no shutdown of the server), starts
// it again and returns its new DSN.
func (c container) Crash(ctx context.Context) (string, error) {
	return c.stopAndStart(ctx, 0)
}

// stopAndStart stops the container, SIGKILL after grace, and starts it.
func (c container) stopAndStart(ctx context.Context, grace time.Duration) (string, error) {
	ctr := c.ctr
	if err := ctr.Stop(ctx, &grace); err != nil {
		return "", err
	}
	// The log wait strategy passes at once now (the log keeps the previous
	// run), so waitReady does the waiting.
	if err := ctr.Start(ctx); err != nil {
		return "", err
	}
	dsn, err := containerDSN(ctx, ctr)
	if err != nil {
		return "", err
	}
	return dsn, pgserver.WaitReady(ctx, dsn, nil)
}

// Stop removes the container.
func (c container) Stop() error {
	return testcontainers.TerminateContainer(c.ctr)
}

func containerDSN(ctx context.Context, ctr *testcontainers.DockerContainer) (string, error) {
	host, err := ctr.Host(ctx)
	if err != nil {
		return "", fmt.Errorf("container host: %w", err)
	}
	port, err := ctr.MappedPort(ctx, "5432/tcp")
	if err != nil {
		return "", fmt.Errorf("container port: %w", err)
	}
	return "postgres://postgres@" + net.JoinHostPort(host, port.Port()) + "/postgres?sslmode=disable", nil
}
