import { describe, expect, it } from 'vitest';
import { decodeDatum, mapCol, optInt, parseListOutput, vsctlValue } from './ovsdb.ts';

describe('ovsdb JSON decoding', () => {
  it('decodes atoms, uuids, sets and maps', () => {
    expect(decodeDatum(5)).toBe(5);
    expect(decodeDatum(['uuid', 'abc'])).toBe('abc');
    expect(decodeDatum(['set', []])).toEqual([]);
    expect(
      decodeDatum([
        'set',
        [
          ['uuid', 'a'],
          ['uuid', 'b'],
        ],
      ]),
    ).toEqual(['a', 'b']);
    expect(
      decodeDatum([
        'map',
        [
          ['k', 'v'],
          ['n', 1],
        ],
      ]),
    ).toEqual({ k: 'v', n: 1 });
    expect(() => decodeDatum({ x: 1 })).toThrow(/unexpected OVSDB atom/);
  });

  it('parses one table per line of a multi-command list', () => {
    const out = [
      JSON.stringify({
        headings: ['name', 'tag'],
        data: [
          ['p1', 3],
          ['p2', ['set', []]],
        ],
      }),
      JSON.stringify({ headings: ['name', 'external_ids'], data: [['i1', ['map', [['iface-id', 'u']]]]] }),
      '',
    ].join('\n');
    const [ports, ifaces] = parseListOutput(out);
    expect(ports!.map((r) => optInt(r, 'tag'))).toEqual([3, undefined]);
    expect(mapCol(ifaces![0]!, 'external_ids')).toEqual({ 'iface-id': 'u' });
    expect(mapCol(ifaces![0]!, 'missing')).toEqual({});
  });

  it('quotes values ovs-vsctl would misparse', () => {
    expect(vsctlValue('vif')).toBe('vif');
    expect(vsctlValue('10.0.0.1')).toBe('"10.0.0.1"');
    expect(vsctlValue('a0a0-1')).toBe('a0a0-1');
    expect(vsctlValue('x y')).toBe('"x y"');
  });
});
