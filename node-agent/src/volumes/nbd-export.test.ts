import { describe, expect, it } from 'vitest';
import {
  checkExportName,
  exportBlockdev,
  exportNodeName,
  isExporterCmdline,
  NbdExporter,
  nbdClientPskDir,
  nbdConnection,
  nbdExportName,
  nbdPaths,
  nodeOfExportName,
  pskFileContent,
  qsdArgs,
  qsdCommand,
} from './nbd-export.ts';

const UID = '6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f';
const SERIAL = '6f1c2d3e4a5b4c6d8e9f';

describe('NBD export names', () => {
  it('derives the export name and node names from the volume uid (contract: vol-<uid>, v<serial>)', () => {
    expect(nbdExportName(UID)).toBe(`vol-${UID}`);
    expect(exportNodeName(UID)).toBe(`v${SERIAL}`);
    expect(nodeOfExportName(`vol-${UID}`)).toBe(`v${SERIAL}`);
    expect(nodeOfExportName('other')).toBeUndefined();
    expect(exportNodeName(UID).length).toBeLessThanOrEqual(31);
  });

  it('accepts only names QMP takes as ids', () => {
    expect(checkExportName(`vol-${UID}`)).toBe(`vol-${UID}`);
    for (const bad of ['', '1vol', 'vol x', 'vol,x', 'vol/x', `vol-${'a'.repeat(200)}`]) {
      expect(() => checkExportName(bad)).toThrow(/invalid NBD export name/);
    }
  });
});

describe('qemu-storage-daemon command line', () => {
  const paths = nbdPaths('/var/lib/stratus');

  it('puts the TLS creds before the NBD server, the QMP monitor, the pid file, daemonized', () => {
    expect(nbdClientPskDir('/var/lib/stratus')).toBe('/var/lib/stratus/nbd-client');
    expect(paths).toEqual({
      dir: '/var/lib/stratus/nbd',
      pskDir: '/var/lib/stratus/nbd/psk',
      pskFile: '/var/lib/stratus/nbd/psk/keys.psk',
      qmpSocket: '/var/lib/stratus/nbd/qsd.qmp',
      pidFile: '/var/lib/stratus/nbd/qsd.pid',
    });
    expect(qsdArgs({ paths, hostIP: '10.0.0.5', port: 10809, maxConnections: 128 })).toEqual([
      '--object',
      'tls-creds-psk,id=tlssrv,endpoint=server,dir=/var/lib/stratus/nbd/psk',
      '--nbd-server',
      'addr.type=inet,addr.host=10.0.0.5,addr.port=10809,tls-creds=tlssrv,max-connections=128',
      '--chardev',
      'socket,id=qmp0,path=/var/lib/stratus/nbd/qsd.qmp,server=on,wait=off',
      '--monitor',
      'chardev=qmp0,mode=control',
      '--pidfile',
      '/var/lib/stratus/nbd/qsd.pid',
      '--daemonize',
    ]);
  });

  it('refuses what QEMU option syntax would misread, and bad ports', () => {
    expect(() => qsdArgs({ paths: nbdPaths('/a,b'), hostIP: '10.0.0.5', port: 10809, maxConnections: 1 })).toThrow(
      /must not contain ','/,
    );
    expect(() => qsdArgs({ paths, hostIP: '10.0.0.5,addr.port=1', port: 10809, maxConnections: 1 })).toThrow(/host IP/);
    expect(() => qsdArgs({ paths, hostIP: '10.0.0.5', port: 0, maxConnections: 1 })).toThrow(/invalid NBD port/);
    expect(
      () => new NbdExporter({ stateDir: '/s', hostIP: '10.0.0.5', psk: { identity: 'stratus', key: 'zz' } }),
    ).toThrow(/invalid PSK key/);
  });

  it('runs the daemon as the QEMU user through setpriv when an owner is given', () => {
    expect(qsdCommand('qemu-storage-daemon', ['--daemonize'])).toEqual(['qemu-storage-daemon', ['--daemonize']]);
    expect(qsdCommand('/usr/bin/qemu-storage-daemon', ['--daemonize'], { uid: 64055, gid: 994 })).toEqual([
      'setpriv',
      [
        '--reuid=64055',
        '--regid=994',
        '--clear-groups',
        '--no-new-privs',
        '--',
        '/usr/bin/qemu-storage-daemon',
        '--daemonize',
      ],
    ]);
    expect(() => qsdCommand('q', [], { uid: -1, gid: 0 })).toThrow(/invalid owner/);
  });

  it('recognises its own daemon by the pid file on its command line (adoption)', () => {
    const argv = [
      '/usr/bin/qemu-storage-daemon',
      ...qsdArgs({ paths, hostIP: '10.0.0.5', port: 10809, maxConnections: 1 }),
    ];
    expect(isExporterCmdline(argv, paths.pidFile)).toBe(true);
    expect(isExporterCmdline(argv, '/other/nbd/qsd.pid')).toBe(false);
    expect(isExporterCmdline(['/usr/bin/qemu-system-x86_64', paths.pidFile], paths.pidFile)).toBe(false);
    expect(isExporterCmdline([], paths.pidFile)).toBe(false); // a zombie
    expect(isExporterCmdline(undefined, paths.pidFile)).toBe(false);
  });
});

describe('PSK files', () => {
  it('writes identity:hexkey (lower case) and validates both', () => {
    expect(pskFileContent({ identity: 'stratus', key: 'AB'.repeat(16) })).toBe(`stratus:${'ab'.repeat(16)}\n`);
    expect(() => pskFileContent({ identity: 'a:b', key: 'ab'.repeat(16) })).toThrow(/identity/);
    expect(() => pskFileContent({ identity: 'stratus', key: 'ab'.repeat(4) })).toThrow(/key/);
    expect(() => pskFileContent({ identity: 'stratus', key: `${'ab'.repeat(16)}\nx:00` })).toThrow(/key/);
  });
});

describe('blockdev trees', () => {
  it('names the exported nodes after the serial, read-only unless writable', () => {
    const tree = { driver: 'qcow2', file: { driver: 'file', filename: '/v/x.qcow2' } };
    expect(exportBlockdev(UID, tree, true)).toEqual({
      driver: 'qcow2',
      'node-name': `v${SERIAL}`,
      file: { driver: 'file', filename: '/v/x.qcow2', 'node-name': `v${SERIAL}-f` },
    });
    expect(exportBlockdev(UID, tree, false)).toEqual({
      driver: 'qcow2',
      'node-name': `v${SERIAL}`,
      'read-only': true,
      file: { driver: 'file', filename: '/v/x.qcow2', 'node-name': `v${SERIAL}-f`, 'read-only': true },
    });
    // The caller's tree is not modified.
    expect(tree).toEqual({ driver: 'qcow2', file: { driver: 'file', filename: '/v/x.qcow2' } });
  });

  it('gives the remote QEMU a raw-over-nbd tree with TLS and reconnect, and its client credentials object', () => {
    const c = nbdConnection({
      volumeId: UID,
      host: '10.0.0.5',
      port: 10809,
      name: `vol-${UID}`,
      clientPskDir: '/var/lib/stratus/nbd-client',
    });
    expect(c).toEqual({
      volumeId: UID,
      serial: SERIAL,
      blockdev: {
        driver: 'raw',
        file: {
          driver: 'nbd',
          server: { type: 'inet', host: '10.0.0.5', port: '10809' },
          export: `vol-${UID}`,
          'tls-creds': `tls${SERIAL}`,
          'reconnect-delay': 10,
        },
      },
      objects: [
        {
          'qom-type': 'tls-creds-psk',
          id: `tls${SERIAL}`,
          endpoint: 'client',
          dir: '/var/lib/stratus/nbd-client',
          username: 'stratus',
        },
      ],
    });
    expect(
      nbdConnection({ volumeId: UID, host: 'h', port: 1, name: 'n', clientPskDir: '/d', readOnly: true }).readOnly,
    ).toBe(true);
  });
});
