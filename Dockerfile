# cdcbackfill in a container: a static binary on distroless, running as
# nonroot. Build: docker build -t cdcbackfill .
#
#   docker run --rm -v $PWD/migration.yaml:/etc/cdcbackfill/migration.yaml:ro \
#     -e CDCBACKFILL_DATABASE_DSN=postgres://app:PASSWORD@db:5432/app \
#     -e CDCBACKFILL_HTTP_LISTEN=0.0.0.0:9187 -p 127.0.0.1:9187:9187 cdcbackfill
#
# http.listen defaults to 127.0.0.1:9187, which nothing outside the container
# reaches: set it to 0.0.0.0:9187 (as above, or in the YAML) to scrape
# /metrics. The image does not set it, so a value in the YAML is not
# silently overridden by the environment.
#
# Other commands run the same way: docker run ... cdcbackfill status --config
# /etc/cdcbackfill/migration.yaml

FROM golang:1.26 AS build
WORKDIR /src
# Modules first, so a code change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# cgo: the statement parser is PostgreSQL's own (libpg_query), compiled in
# (about a minute the first time). Linked statically (netgo, osusergo: no
# libc resolver or user database at run time), so distroless static runs it.
RUN CGO_ENABLED=1 go build -trimpath -tags netgo,osusergo -ldflags "-s -w -linkmode external -extldflags -static" -o /out/cdcbackfill ./cmd/cdcbackfill

# static-debian12 has CA certificates (sslmode=verify-full) and tzdata;
# :nonroot runs as uid 65532.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/cdcbackfill /cdcbackfill
USER nonroot:nonroot
EXPOSE 9187
ENTRYPOINT ["/cdcbackfill"]
CMD ["run", "--config", "/etc/cdcbackfill/migration.yaml"]
