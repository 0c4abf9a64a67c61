package main

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

const kib = 1024

func writeAt(t *testing.T, path string, offset int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, offset); err != nil {
		t.Fatal(err)
	}
}

func filled(n int, b byte) []byte {
	data := make([]byte, n)
	for i := range data {
		data[i] = b
	}
	return data
}

func indexes(d blockDigests) []int64 {
	var out []int64
	for _, x := range d {
		out = append(out, x.index)
	}
	return out
}

func TestDigestFileSkipsZeroBlocksAndHoles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk-flat.vmdk")
	writeAt(t, path, 0, filled(10, 1))               // block 0
	writeAt(t, path, 3*64*kib, make([]byte, 64*kib)) // block 3: written, but zeros
	writeAt(t, path, 5*64*kib+7, filled(1, 2))       // block 5, after a hole
	digests, err := digestFile(path, 1024*kib, 64*kib)
	if err != nil {
		t.Fatal(err)
	}
	if got := indexes(digests); !reflect.DeepEqual(got, []int64{0, 5}) {
		t.Fatalf("non-zero blocks = %v, want [0 5]", got)
	}
}

func TestDigestFileIgnoresBytesPastCapacity(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk-flat.vmdk")
	writeAt(t, path, 128*kib, filled(10, 1))
	digests, err := digestFile(path, 128*kib, 64*kib)
	if err != nil || len(digests) != 0 {
		t.Fatalf("digests = %v, %v; want none", digests, err)
	}
}

func TestShortFileEqualsZeroPaddedFile(t *testing.T) {
	dir := t.TempDir()
	short, padded := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	writeAt(t, short, 0, filled(100, 9))
	writeAt(t, padded, 0, append(filled(100, 9), make([]byte, 200*kib)...))
	a, errA := digestFile(short, 256*kib, 64*kib)
	b, errB := digestFile(padded, 256*kib, 64*kib)
	if errA != nil || errB != nil || !reflect.DeepEqual(a, b) {
		t.Fatalf("a zero-extended file must digest like the short one: %v %v", errA, errB)
	}
}

func TestChangedBlocks(t *testing.T) {
	sum := func(b byte) (s [32]byte) { s[0] = b; return s }
	base := blockDigests{{1, sum(1)}, {2, sum(2)}, {4, sum(4)}}
	target := blockDigests{{0, sum(0)}, {2, sum(2)}, {4, sum(5)}, {9, sum(9)}}
	// 0 new, 1 zeroed, 2 same, 4 rewritten, 9 new
	if got := changedBlocks(base, target); !reflect.DeepEqual(got, []int64{0, 1, 4, 9}) {
		t.Fatalf("changed = %v", got)
	}
	if got := changedBlocks(nil, target); !reflect.DeepEqual(got, []int64{0, 2, 4, 9}) {
		t.Fatalf("allocated = %v", got)
	}
}

func TestMergeBlocksJoinsNeighboursAndClipsTheLastBlock(t *testing.T) {
	got := mergeBlocks([]int64{0, 1, 3, 4}, 4*10+5, 10)
	want := []extent{{0, 20}, {30, 15}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("extents = %v, want %v", got, want)
	}
}

func TestPageBySpan(t *testing.T) {
	extents := []extent{{0, 10}, {25, 20}, {90, 10}}
	covered, inside := page(extents, 0, 100, 30, 10)
	if covered != 30 || !reflect.DeepEqual(inside, []extent{{0, 10}, {25, 5}}) {
		t.Fatalf("page 1 = %d %v", covered, inside)
	}
	covered, inside = page(extents, 30, 100, 30, 10)
	if covered != 30 || !reflect.DeepEqual(inside, []extent{{30, 15}}) {
		t.Fatalf("page 2 = %d %v", covered, inside)
	}
	covered, inside = page(extents, 90, 100, 30, 10)
	if covered != 10 || !reflect.DeepEqual(inside, []extent{{90, 10}}) {
		t.Fatalf("last page = %d %v", covered, inside)
	}
}

func TestPageByExtentCount(t *testing.T) {
	extents := []extent{{0, 10}, {20, 10}, {40, 10}}
	covered, inside := page(extents, 0, 100, 100, 2)
	if covered != 30 || len(inside) != 2 {
		t.Fatalf("page 1 = %d %v", covered, inside)
	}
	covered, inside = page(extents, 30, 100, 100, 2)
	if covered != 70 || !reflect.DeepEqual(inside, []extent{{40, 10}}) {
		t.Fatalf("page 2 = %d %v", covered, inside)
	}
}

func TestChangeIDRoundTrip(t *testing.T) {
	epoch := newEpoch()
	if epoch[:2] != "52" || epoch == newEpoch() {
		t.Fatalf("epoch %q", epoch)
	}
	gotEpoch, sequence, ok := parseChangeID(formatChangeID(epoch, 12))
	if !ok || gotEpoch != epoch || sequence != 12 {
		t.Fatalf("parsed %q %d %v", gotEpoch, sequence, ok)
	}
	for _, bad := range []string{"", "*", "52 00/1", epoch, epoch + "/x", epoch + "/-1"} {
		if _, _, ok := parseChangeID(bad); ok {
			t.Errorf("%q parsed", bad)
		}
	}
}
