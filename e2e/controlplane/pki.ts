// Certificates and kubeconfigs for the local control plane, made with the openssl CLI.
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { stringify } from 'yaml';
import { exists, run } from './util.ts';

/** First address of --service-cluster-ip-range, used by the in-cluster `kubernetes` Service. */
export const FIRST_SERVICE_IP = '10.96.0.1';
/** CN of the front-proxy client certificate (--requestheader-allowed-names). */
export const FRONT_PROXY_CLIENT = 'front-proxy-client';

const OPENSSL_CONF = `[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
`;

export interface PkiPaths {
  dir: string;
  caCert: string;
  caKey: string;
  serverCert: string;
  serverKey: string;
  adminCert: string;
  adminKey: string;
  kcmCert: string;
  kcmKey: string;
  schedulerCert: string;
  schedulerKey: string;
  /** kube-apiserver's client identity towards kubelets (logs, exec, port-forward): O=system:masters. */
  kubeletClientCert: string;
  kubeletClientKey: string;
  saKey: string;
  saPub: string;
  frontProxyCaCert: string;
  frontProxyCaKey: string;
  frontProxyClientCert: string;
  frontProxyClientKey: string;
}

export function pkiPaths(stateDir: string): PkiPaths {
  const dir = path.join(stateDir, 'pki');
  const p = (f: string) => path.join(dir, f);
  return {
    dir,
    caCert: p('ca.crt'),
    caKey: p('ca.key'),
    serverCert: p('apiserver.crt'),
    serverKey: p('apiserver.key'),
    adminCert: p('admin.crt'),
    adminKey: p('admin.key'),
    kcmCert: p('kube-controller-manager.crt'),
    kcmKey: p('kube-controller-manager.key'),
    schedulerCert: p('kube-scheduler.crt'),
    schedulerKey: p('kube-scheduler.key'),
    kubeletClientCert: p('apiserver-kubelet-client.crt'),
    kubeletClientKey: p('apiserver-kubelet-client.key'),
    saKey: p('sa.key'),
    saPub: p('sa.pub'),
    frontProxyCaCert: p('front-proxy-ca.crt'),
    frontProxyCaKey: p('front-proxy-ca.key'),
    frontProxyClientCert: p('front-proxy-client.crt'),
    frontProxyClientKey: p('front-proxy-client.key'),
  };
}

/** Escapes a value for an `openssl -subj` component. */
function rdn(value: string): string {
  return value.replace(/[\\/+=,]/g, (c) => `\\${c}`);
}

function subject(cn: string, orgs: readonly string[]): string {
  return `/CN=${rdn(cn)}${orgs.map((o) => `/O=${rdn(o)}`).join('')}`;
}

async function genEcKey(keyFile: string): Promise<void> {
  await run('openssl', ['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', keyFile]);
}

/** True when the certificate exists and stays valid for at least another day. */
async function certValid(certFile: string): Promise<boolean> {
  if (!(await exists(certFile))) return false;
  try {
    await run('openssl', ['x509', '-checkend', '86400', '-noout', '-in', certFile]);
    return true;
  } catch {
    return false;
  }
}

interface LeafOptions {
  cn: string;
  orgs?: readonly string[];
  server?: { dns: string[]; ips: string[] };
  days?: number;
}

/** Writes key + certificate signed by the CA, via temporary files renamed into place. */
async function issueLeaf(
  pki: PkiPaths,
  certFile: string,
  keyFile: string,
  opts: LeafOptions,
  ca: { cert: string; key: string } = { cert: pki.caCert, key: pki.caKey },
): Promise<void> {
  const tag = `${process.pid}-${randomBytes(4).toString('hex')}`;
  const tmpKey = `${keyFile}.${tag}.tmp`;
  const tmpCsr = `${certFile}.${tag}.csr`;
  const tmpCrt = `${certFile}.${tag}.tmp`;
  const extFile = `${certFile}.${tag}.ext`;
  const san = opts.server
    ? `subjectAltName = ${[...opts.server.dns.map((d) => `DNS:${d}`), ...opts.server.ips.map((i) => `IP:${i}`)].join(', ')}\n`
    : '';
  const ext = `[v3]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = ${opts.server ? 'serverAuth' : 'clientAuth'}
authorityKeyIdentifier = keyid
${san}`;
  try {
    await genEcKey(tmpKey);
    await writeFile(extFile, ext);
    await run('openssl', [
      'req',
      '-new',
      '-key',
      tmpKey,
      '-subj',
      subject(opts.cn, opts.orgs ?? []),
      '-config',
      path.join(pki.dir, 'openssl.cnf'),
      '-out',
      tmpCsr,
    ]);
    await run('openssl', [
      'x509',
      '-req',
      '-in',
      tmpCsr,
      '-CA',
      ca.cert,
      '-CAkey',
      ca.key,
      '-set_serial',
      `0x${randomBytes(16).toString('hex')}`,
      '-days',
      String(opts.days ?? 365),
      '-sha256',
      '-extfile',
      extFile,
      '-extensions',
      'v3',
      '-out',
      tmpCrt,
    ]);
    await rename(tmpKey, keyFile);
    await rename(tmpCrt, certFile);
  } finally {
    await Promise.all([tmpKey, tmpCsr, tmpCrt, extFile].map((f) => rm(f, { force: true })));
  }
}

/** Creates a self-signed CA unless a valid one exists; returns true when it (re)created it. */
async function ensureCa(pki: PkiPaths, certFile: string, keyFile: string, cn: string): Promise<boolean> {
  if ((await exists(keyFile)) && (await certValid(certFile))) return false;
  await genEcKey(keyFile);
  await run('openssl', [
    'req',
    '-x509',
    '-new',
    '-key',
    keyFile,
    '-subj',
    `/CN=${cn}`,
    '-config',
    path.join(pki.dir, 'openssl.cnf'),
    '-extensions',
    'v3_ca',
    '-days',
    '3650',
    '-sha256',
    '-out',
    certFile,
  ]);
  return true;
}

/**
 * Creates whatever is missing (or expiring) of the CA, serving/client certificates and the SA key pair.
 * `extraServerIps` are added to the API server certificate's SANs (the address pods reach it on, see
 * controlplane.ts); the certificate is reissued when that list changes.
 */
export async function ensurePki(stateDir: string, extraServerIps: readonly string[] = []): Promise<PkiPaths> {
  const pki = pkiPaths(stateDir);
  await mkdir(pki.dir, { recursive: true, mode: 0o700 });
  const conf = path.join(pki.dir, 'openssl.cnf');
  if ((await readFile(conf, 'utf8').catch(() => '')) !== OPENSSL_CONF) await writeFile(conf, OPENSSL_CONF);

  const caFresh = await ensureCa(pki, pki.caCert, pki.caKey, 'stratus-local-ca');
  const serverIps = ['127.0.0.1', '::1', FIRST_SERVICE_IP, ...extraServerIps];
  const sansFile = path.join(pki.dir, 'apiserver.ips');
  const sansChanged =
    (await readFile(sansFile, 'utf8').catch(() => '127.0.0.1\n::1\n10.96.0.1\n')) !== `${serverIps.join('\n')}\n`;
  if (caFresh || sansChanged || !(await certValid(pki.serverCert))) {
    await issueLeaf(pki, pki.serverCert, pki.serverKey, {
      cn: 'kube-apiserver',
      server: {
        dns: [
          'localhost',
          'kubernetes',
          'kubernetes.default',
          'kubernetes.default.svc',
          'kubernetes.default.svc.cluster.local',
        ],
        ips: serverIps,
      },
    });
    await writeFile(sansFile, `${serverIps.join('\n')}\n`);
  }
  if (caFresh || !(await certValid(pki.adminCert))) {
    await issueLeaf(pki, pki.adminCert, pki.adminKey, { cn: 'stratus-admin', orgs: ['system:masters'] });
  }
  if (caFresh || !(await certValid(pki.kcmCert))) {
    await issueLeaf(pki, pki.kcmCert, pki.kcmKey, { cn: 'system:kube-controller-manager' });
  }
  if (caFresh || !(await certValid(pki.schedulerCert))) {
    await issueLeaf(pki, pki.schedulerCert, pki.schedulerKey, { cn: 'system:kube-scheduler' });
  }
  if (caFresh || !(await certValid(pki.kubeletClientCert))) {
    await issueLeaf(pki, pki.kubeletClientCert, pki.kubeletClientKey, {
      cn: 'kube-apiserver-kubelet-client',
      orgs: ['system:masters'],
    });
  }
  // Front-proxy (request-header) CA: the aggregation layer's client identity, and what delegated authentication in
  // kube-controller-manager (and any aggregated API server) expects to find in extension-apiserver-authentication.
  const fpFresh = await ensureCa(pki, pki.frontProxyCaCert, pki.frontProxyCaKey, 'stratus-front-proxy-ca');
  if (fpFresh || !(await certValid(pki.frontProxyClientCert))) {
    await issueLeaf(
      pki,
      pki.frontProxyClientCert,
      pki.frontProxyClientKey,
      { cn: FRONT_PROXY_CLIENT },
      { cert: pki.frontProxyCaCert, key: pki.frontProxyCaKey },
    );
  }
  if (!(await exists(pki.saKey)) || !(await exists(pki.saPub))) {
    await run('openssl', ['genpkey', '-algorithm', 'RSA', '-pkeyopt', 'rsa_keygen_bits:2048', '-out', pki.saKey]);
    await run('openssl', ['pkey', '-in', pki.saKey, '-pubout', '-out', pki.saPub]);
  }
  return pki;
}

export interface KubeconfigSpec {
  server: string;
  caCert: string;
  clientCert: string;
  clientKey: string;
  user: string;
  clusterName?: string;
}

/** Writes a self-contained kubeconfig (certificates embedded as base64), atomically. */
export async function writeKubeconfig(file: string, spec: KubeconfigSpec): Promise<void> {
  const b64 = async (f: string) => (await readFile(f)).toString('base64');
  const cluster = spec.clusterName ?? 'stratus';
  const context = `${spec.user}@${cluster}`;
  const doc = {
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [
      { name: cluster, cluster: { server: spec.server, 'certificate-authority-data': await b64(spec.caCert) } },
    ],
    users: [
      {
        name: spec.user,
        user: {
          'client-certificate-data': await b64(spec.clientCert),
          'client-key-data': await b64(spec.clientKey),
        },
      },
    ],
    contexts: [{ name: context, context: { cluster, user: spec.user } }],
    'current-context': context,
    preferences: {},
  };
  await mkdir(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}-${randomBytes(4).toString('hex')}.tmp`;
  await writeFile(tmp, stringify(doc), { mode: 0o600 });
  await rename(tmp, file);
}

/**
 * Issues a client certificate CN=<user>, O=<each group> signed by the cluster CA and writes
 * `<state>/users/<user>.kubeconfig` pointing at `server`. Returns the kubeconfig path.
 */
export async function mintUserKubeconfig(
  stateDir: string,
  server: string,
  user: string,
  groups: readonly string[] = [],
): Promise<string> {
  if (!user || user.includes('\0')) throw new Error(`invalid user name ${JSON.stringify(user)}`);
  const pki = pkiPaths(stateDir);
  if (!(await exists(pki.caKey))) throw new Error(`no cluster CA in ${pki.dir}: run npm run cluster -- up first`);
  const usersDir = path.join(stateDir, 'users');
  await mkdir(usersDir, { recursive: true, mode: 0o700 });
  const safe = user.replace(/[^A-Za-z0-9._@-]/g, '_');
  const cert = path.join(usersDir, `${safe}.crt`);
  const key = path.join(usersDir, `${safe}.key`);
  // Unique intermediate names keep concurrent mints of the same user from mixing keys and certificates.
  const tag = `${process.pid}-${randomBytes(4).toString('hex')}`;
  const tmpCert = `${cert}.${tag}`;
  const tmpKey = `${key}.${tag}`;
  try {
    await issueLeaf(pki, tmpCert, tmpKey, { cn: user, orgs: groups });
    const file = path.join(usersDir, `${safe}.kubeconfig`);
    await writeKubeconfig(file, { server, caCert: pki.caCert, clientCert: tmpCert, clientKey: tmpKey, user });
    await rename(tmpKey, key);
    await rename(tmpCert, cert);
    return file;
  } finally {
    await Promise.all([tmpCert, tmpKey].map((f) => rm(f, { force: true })));
  }
}
