// changeIds in the shape real vSphere uses: "<epoch>/<sequence>".
//
// The epoch is the UUID of the disk's change-tracking file, written like vSphere writes
// it ("52 1d 5c 46 e3 d0 bb 9a-87 3f 36 75 7f 2b 2e 5c"); it is new every time change
// tracking starts afresh (first snapshot after CBT was enabled, CBT disabled and
// re-enabled, disk replaced). The sequence counts snapshots within one epoch, from 1.

package main

import (
	"crypto/rand"
	"fmt"
	"regexp"
	"strconv"
)

// anyChangeID asks QueryChangedDiskAreas for all allocated areas instead of changes.
const anyChangeID = "*"

var changeIDPattern = regexp.MustCompile(`^((?:[0-9a-f]{2} ){7}[0-9a-f]{2}-[0-9a-f]{2}(?: [0-9a-f]{2}){7})/([0-9]+)$`)

// newEpoch returns a fresh random epoch; the first byte is 0x52 as on ESXi.
func newEpoch() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // the kernel's random source never fails on Linux
	}
	b[0] = 0x52
	s := ""
	for i, x := range b {
		switch {
		case i == 8:
			s += "-"
		case i > 0:
			s += " "
		}
		s += fmt.Sprintf("%02x", x)
	}
	return s
}

func formatChangeID(epoch string, sequence int) string {
	return fmt.Sprintf("%s/%d", epoch, sequence)
}

// parseChangeID splits a changeId into epoch and sequence; ok is false when it is
// malformed (real vSphere answers InvalidArgument "changeId" then).
func parseChangeID(id string) (epoch string, sequence int, ok bool) {
	m := changeIDPattern.FindStringSubmatch(id)
	if m == nil {
		return "", 0, false
	}
	sequence, err := strconv.Atoi(m[2])
	if err != nil {
		return "", 0, false
	}
	return m[1], sequence, true
}
