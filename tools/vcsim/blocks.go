// Block digests of a disk's backing file and the changed areas between two of them.
//
// Nothing here knows about vSphere objects: these are pure functions over files and
// sorted slices, unit-tested in blocks_test.go.

package main

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"sort"
	"syscall"
)

// seekData is Linux's SEEK_DATA whence (not exported by package syscall): it moves to
// the next offset holding data, so holes in sparse backing files are never read.
const seekData = 3

// blockDigest is the SHA-256 of one non-zero block; all-zero blocks are not stored.
type blockDigest struct {
	index int64
	sum   [sha256.Size]byte
}

// blockDigests lists the non-zero blocks of a disk, sorted by index.
type blockDigests []blockDigest

// extent is a byte range of a disk, [start, start+length).
type extent struct {
	start, length int64
}

func (e extent) end() int64 { return e.start + e.length }

// digestFile hashes the first capacity bytes of path in blocks of blockSize bytes.
// Bytes past the end of the file read as zeros, like an unwritten area of a thin disk;
// bytes past capacity are ignored.
func digestFile(path string, capacity, blockSize int64) (blockDigests, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()

	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	end := info.Size()
	if end > capacity {
		end = capacity
	}

	buf := make([]byte, blockSize)
	zero := make([]byte, blockSize)
	var digests blockDigests
	for offset := int64(0); offset < end; offset += blockSize {
		next, err := nextData(f, offset)
		if errors.Is(err, syscall.ENXIO) {
			break // only holes remain
		}
		if err != nil {
			return nil, err
		}
		offset = next - next%blockSize
		if offset >= end {
			break
		}
		block := buf[:blockLength(offset, capacity, blockSize)]
		n, err := f.ReadAt(block, offset)
		if err != nil && err != io.EOF {
			return nil, err
		}
		copy(block[n:], zero) // a short read is the end of the file: the rest reads as zeros
		if !bytes.Equal(block, zero[:len(block)]) {
			digests = append(digests, blockDigest{index: offset / blockSize, sum: sha256.Sum256(block)})
		}
	}
	return digests, nil
}

// nextData returns the first offset >= offset that holds data. File systems without
// SEEK_DATA support answer EINVAL; then every offset counts as data.
func nextData(f *os.File, offset int64) (int64, error) {
	next, err := f.Seek(offset, seekData)
	if errors.Is(err, syscall.EINVAL) {
		return offset, nil
	}
	return next, err
}

// blockLength is the length of the block at offset, shorter for the disk's last block
// when the capacity is not a multiple of the block size.
func blockLength(offset, capacity, blockSize int64) int64 {
	if offset+blockSize > capacity {
		return capacity - offset
	}
	return blockSize
}

// changedBlocks returns the indexes of the blocks whose contents differ between base and
// target, in order. A nil base means "compare with an empty disk": every non-zero block
// of target is returned, which is what changeId "*" asks for.
func changedBlocks(base, target blockDigests) []int64 {
	var changed []int64
	i, j := 0, 0
	for i < len(base) || j < len(target) {
		switch {
		case j == len(target) || (i < len(base) && base[i].index < target[j].index):
			changed = append(changed, base[i].index) // written with zeros since base
			i++
		case i == len(base) || target[j].index < base[i].index:
			changed = append(changed, target[j].index)
			j++
		default:
			if base[i].sum != target[j].sum {
				changed = append(changed, target[j].index)
			}
			i++
			j++
		}
	}
	return changed
}

// mergeBlocks turns sorted block indexes into byte extents, joining neighbours and
// clipping the last block to the disk's capacity.
func mergeBlocks(blocks []int64, capacity, blockSize int64) []extent {
	var extents []extent
	for _, index := range blocks {
		start := index * blockSize
		length := blockLength(start, capacity, blockSize)
		if n := len(extents); n > 0 && extents[n-1].end() == start {
			extents[n-1].length += length
			continue
		}
		extents = append(extents, extent{start: start, length: length})
	}
	return extents
}

// page cuts the answer to one QueryChangedDiskAreas call out of all extents: the range
// starts at startOffset and covers at most span bytes and maxExtents extents, like the
// per-call limit of real vSphere. It returns the length of the range covered and the
// extents inside it (clipped to it); callers continue at startOffset+covered.
func page(extents []extent, startOffset, capacity, span int64, maxExtents int) (int64, []extent) {
	end := startOffset + span
	if end > capacity || end < startOffset { // the second test catches overflow
		end = capacity
	}
	first := sort.Search(len(extents), func(i int) bool { return extents[i].end() > startOffset })
	var inside []extent
	for _, e := range extents[first:] {
		if e.start >= end {
			break
		}
		if len(inside) == maxExtents {
			end = inside[len(inside)-1].end()
			break
		}
		if e.start < startOffset {
			e = extent{start: startOffset, length: e.end() - startOffset}
		}
		if e.end() > end {
			e.length = end - e.start
		}
		inside = append(inside, e)
	}
	return end - startOffset, inside
}
