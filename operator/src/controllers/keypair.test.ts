import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { sshFingerprint } from './keypair.ts';

describe('sshFingerprint', () => {
  it('matches ssh-keygen -l for a fresh key', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kp-'));
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'x@y', '-f', join(dir, 'k')]);
    const pub = readFileSync(join(dir, 'k.pub'), 'utf8');
    const expected = execFileSync('ssh-keygen', ['-l', '-E', 'sha256', '-f', join(dir, 'k.pub')], {
      encoding: 'utf8',
    }).split(' ')[1];
    expect(sshFingerprint(pub)).toBe(expected);
  });
  it('refuses a blob whose embedded type differs or that is not base64 of a key', () => {
    const ed = 'AAAAC3NzaC1lZDI1NTE5AAAAIAmz3JDWliYPOvngSOOj7kbnvOx8hgyJugms5NIm/MrM';
    expect(sshFingerprint(`ssh-ed25519 ${ed} c`)).toMatch(/^SHA256:/);
    expect(sshFingerprint(`ssh-rsa ${ed} c`)).toBeUndefined();
    expect(sshFingerprint('ssh-ed25519 AAAA')).toBeUndefined();
  });
});
