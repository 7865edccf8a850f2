import { describe, expect, it } from 'vitest';
import { parseCidr, type ResolvedAddress, UrlGuard, UrlRefusedError, unmapIPv4 } from './urlguard.ts';

const resolver =
  (table: Record<string, ResolvedAddress[]>, calls: string[] = []) =>
  async (host: string) => {
    calls.push(host);
    const r = table[host];
    if (!r) throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${host}`), { code: 'ENOTFOUND' });
    return r;
  };

async function refused(p: Promise<unknown>): Promise<string> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(UrlRefusedError);
  return (err as Error).message;
}

describe('UrlGuard.refusal (address classification)', () => {
  const guard = new UrlGuard();

  it('refuses loopback, link-local (the metadata address included) and unspecified addresses by default', () => {
    for (const a of ['127.0.0.1', '127.1.2.3', '::1']) expect(guard.refusal(a)).toBe('a loopback address');
    for (const a of ['169.254.169.254', '169.254.0.1', 'fe80::1', 'fe80::1%eth0', 'febf::1']) {
      expect(guard.refusal(a)).toBe('a link-local address');
    }
    for (const a of ['0.0.0.0', '0.1.2.3', '::']) expect(guard.refusal(a)).toBe('an unspecified address');
  });

  it('sees through IPv4-mapped IPv6 addresses in every spelling', () => {
    for (const a of ['::ffff:127.0.0.1', '::ffff:7f00:1', '0:0:0:0:0:ffff:7f00:1', '::FFFF:127.0.0.1']) {
      expect(guard.refusal(a)).toBe('a loopback address');
    }
    expect(guard.refusal('::ffff:a9fe:a9fe')).toBe('a link-local address');
    expect(unmapIPv4('::ffff:a9fe:a9fe')).toBe('169.254.169.254');
    expect(unmapIPv4('2001:db8::1')).toBe('2001:db8::1');
    expect(guard.refusal('::ffff:10.0.0.1')).toBeUndefined();
  });

  it('lets other addresses through: private, public, IPv6 global and unique-local', () => {
    for (const a of ['10.0.0.1', '192.168.1.10', '172.16.0.1', '8.8.8.8', '2001:db8::1', 'fd00::1', '128.0.0.1']) {
      expect(guard.refusal(a)).toBeUndefined();
    }
    expect(guard.refusal('not-an-ip')).toBe('not an IP address');
  });

  it('refuses the configured ranges (the cluster service and pod CIDRs) and allows what the admin allows', () => {
    const g = new UrlGuard({ denyCidrs: ['10.96.0.0/12', 'fd10::/64'], allowCidrs: ['127.0.0.0/8', '10.96.0.10'] });
    expect(g.refusal('10.100.1.1')).toBe('in the denied range 10.96.0.0/12 (--image-url-deny-cidr)');
    expect(g.refusal('::ffff:10.100.1.1')).toBe('in the denied range 10.96.0.0/12 (--image-url-deny-cidr)');
    expect(g.refusal('fd10::5')).toBe('in the denied range fd10::/64 (--image-url-deny-cidr)');
    expect(g.refusal('10.112.0.1')).toBeUndefined();
    // Allowed wins over denied, default or configured.
    expect(g.refusal('127.0.0.1')).toBeUndefined();
    expect(g.refusal('::ffff:127.0.0.1')).toBeUndefined();
    expect(g.refusal('10.96.0.10')).toBeUndefined();
    expect(g.refusal('::1')).toBe('a loopback address');
    expect(g.refusal('169.254.169.254')).toBe('a link-local address');
  });

  it('parses CIDRs and single addresses, and refuses malformed ones', () => {
    expect(parseCidr('10.96.0.0/12')).toEqual({ address: '10.96.0.0', prefix: 12, family: 4 });
    expect(parseCidr('::1')).toEqual({ address: '::1', prefix: 128, family: 6 });
    for (const bad of ['10.0.0.0/33', 'fe80::/129', '10.0.0.0/', '10.0.0.0/a', 'example.com/8', '', '/8']) {
      expect(() => parseCidr(bad)).toThrow(TypeError);
    }
    expect(() => new UrlGuard({ allowCidrs: ['127.0.0.0/40'] })).toThrow(/prefix length must be 0 to 32/);
  });
});

describe('UrlGuard.vet', () => {
  it('refuses an IP literal in a denied range, naming URL, address, range and the flag', async () => {
    const guard = new UrlGuard({ resolve: resolver({}) });
    expect(await refused(guard.vet(new URL('http://127.0.0.1:8080/x')))).toBe(
      'image URL http://127.0.0.1:8080/x resolves to 127.0.0.1, a loopback address; refused (allow it with --image-url-allow-cidr)',
    );
    expect(await refused(guard.vet(new URL('http://[::ffff:169.254.169.254]/latest/meta-data/')))).toBe(
      'image URL http://[::ffff:a9fe:a9fe]/latest/meta-data/ resolves to 169.254.169.254, a link-local address; refused (allow it with --image-url-allow-cidr)',
    );
    expect(await guard.vet(new URL('https://[2001:db8::1]/x'))).toEqual([{ address: '2001:db8::1', family: 6 }]);
  });

  it('resolves a name once and refuses it when any of its addresses is denied', async () => {
    const calls: string[] = [];
    const guard = new UrlGuard({
      resolve: resolver(
        {
          'images.example': [{ address: '203.0.113.7', family: 4 }],
          'mixed.example': [
            { address: '203.0.113.8', family: 4 },
            { address: '::1', family: 6 },
          ],
          'metadata.example': [{ address: '169.254.169.254', family: 4 }],
        },
        calls,
      ),
    });
    expect(await guard.vet(new URL('http://images.example/img.qcow2'))).toEqual([
      { address: '203.0.113.7', family: 4 },
    ]);
    expect(await refused(guard.vet(new URL('http://mixed.example/img.qcow2')))).toBe(
      'image URL http://mixed.example/img.qcow2 resolves to ::1, a loopback address; refused (allow it with --image-url-allow-cidr)',
    );
    expect(await refused(guard.vet(new URL('http://metadata.example/latest'), 'http://images.example/img.qcow2'))).toBe(
      'image URL http://metadata.example/latest (redirected from http://images.example/img.qcow2) resolves to 169.254.169.254, a link-local address; refused (allow it with --image-url-allow-cidr)',
    );
    expect(calls).toEqual(['images.example', 'mixed.example', 'metadata.example']);
    await expect(guard.vet(new URL('http://nowhere.example/'))).rejects.toThrow('ENOTFOUND nowhere.example');
  });
});
