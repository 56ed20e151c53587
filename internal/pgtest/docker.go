package pgtest

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

const dockerImage = "postgres:16-alpine"

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

// startDocker runs a container and returns it with its superuser DSN.
func startDocker(ctx context.Context) (*testcontainers.DockerContainer, string, error) {
	ctr, err := testcontainers.Run(ctx, dockerImage,
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
		return nil, "", fmt.Errorf("run %s: %w", dockerImage, err)
	}
	dsn, err := containerDSN(ctx, ctr)
	if err == nil {
		err = waitReady(ctx, dsn, nil)
	}
	if err != nil {
		_ = testcontainers.TerminateContainer(ctr)
		return nil, "", err
	}
	return ctr, dsn, nil
}

// restartDocker stops and starts the container and returns its new DSN.
func restartDocker(ctx context.Context, ctr *testcontainers.DockerContainer) (string, error) {
	timeout := 30 * time.Second
	if err := ctr.Stop(ctx, &timeout); err != nil {
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
	return dsn, waitReady(ctx, dsn, nil)
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
