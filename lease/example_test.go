package lease_test

import (
	"errors"
	"fmt"

	"github.com/pgcache/pgcache/lease"
)

func ExampleParseCommand() {
	cmd, err := lease.ParseCommand([]byte("set post:1 0 60 5 noreply\r\n"), 1<<20)
	fmt.Println(cmd.Op, cmd.Keys, cmd.Exptime, cmd.Bytes, cmd.NoReply, err)

	_, err = lease.ParseCommand([]byte("set post:1 0 0 -1\r\n"), 1<<20)
	var pe *lease.ProtocolError
	if errors.As(err, &pe) {
		fmt.Println(pe.Reply, errors.Is(err, lease.ErrBadCommand))
	}
	// Output:
	// set [post:1] 60 5 true <nil>
	// CLIENT_ERROR bad command line format true
}
