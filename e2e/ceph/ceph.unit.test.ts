// The test cluster's configuration (pure): one replica, small memory, every path under the state directory, the mon
// on both messengers of the bind address. The bootstrap itself runs in e2e/tests/volume-rbd.test.ts.
import { describe, expect, it } from 'vitest';
import { cephConf, defaultCephDir } from './ceph.ts';

describe('test ceph.conf', () => {
  const conf = cephConf('/state', 'f5f1', '172.31.252.1');
  const values = new Map(
    conf
      .split('\n')
      .filter((l) => l.includes(' = '))
      .map((l) => l.split(' = ') as [string, string]),
  );
  it('runs one replica on one OSD without warnings about it', () => {
    expect(values.get('osd_pool_default_size')).toBe('1');
    expect(values.get('mon_allow_pool_size_one')).toBe('true');
    expect(values.get('mon_warn_on_pool_no_redundancy')).toBe('false');
    expect(values.get('osd_crush_chooseleaf_type')).toBe('0');
  });
  it('binds mon and OSD to the given address, msgr2 and v1', () => {
    expect(values.get('mon_host')).toBe('[v2:172.31.252.1:3300,v1:172.31.252.1:6789]');
    expect(values.get('public_addr')).toBe('172.31.252.1');
  });
  it('keeps BlueStore in a file outside the OSD directory and memory at the minimum target', () => {
    expect(values.get('osd_objectstore')).toBe('bluestore');
    expect(values.get('bluestore_block_path')).toBe('/state/osd/$cluster-$id.block');
    expect(values.get('bluestore_block_create')).toBe('true');
    expect(Number(values.get('osd_memory_target'))).toBe(896 * 1048576);
  });
  it('keeps every path under the state directory', () => {
    for (const k of ['run_dir', 'admin_socket', 'log_file', 'keyring', 'mon_data', 'mgr_data', 'osd_data'])
      expect(values.get(k), k).toMatch(/^\/state\//);
  });
  it('defaults the state directory to the cache', () => {
    const saved = { ...process.env };
    try {
      delete process.env.STRATUS_CEPH_DIR;
      process.env.STRATUS_CACHE_DIR = '/c';
      expect(defaultCephDir()).toBe('/c/ceph-run');
      process.env.STRATUS_CEPH_DIR = '/x/y';
      expect(defaultCephDir()).toBe('/x/y');
    } finally {
      process.env = saved;
    }
  });
});
